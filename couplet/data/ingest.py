"""Stage 1 — ingest: fetch the couplet dataset into the immutable raw layer (couplet/data/raw.py) and
parse it. The parsed pairs go to `data/processed/ingest/<key>/pairs.parquet` with columns `split`,
`line_no`, `up`, `down`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from couplet.core.catalog import DATASET_LAYOUT, INGEST_FILES, Catalog
from couplet.core.config import DataConfig
from couplet.data.raw import SPLITS, IngestError, fetch_raw
from couplet.core.stage import run_cached, stage_key
from couplet.data.streaming import RowGroupWriter

# Separators the raw files put between characters (and stray ones we tolerate): ASCII space, tab,
# ideographic space, and a BOM that some editors leave at the start of a file.
SEPARATORS_REGEX = "[ \t\r\u3000\ufeff]"


# --------------------------------------------------------------------------- parsing

BATCH_LINES = 1 << 16  # pairs per batch: parsing holds a few batches, never the whole file
BLOCK_BYTES = 2 << 20  # bytes read at a time
PAIRS_SCHEMA = pa.schema([("split", pa.string()), ("line_no", pa.int32()), ("up", pa.string()), ("down", pa.string())])


def _raw_lines(path: Path, label: str) -> Iterator[list[str]]:
    """The file's lines (without their newline) in blocks. Invalid UTF-8 names the file, line and byte."""
    lines_before = offset = 0
    carry = b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(BLOCK_BYTES)
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
                if not data:
                    continue
            elif not data:
                return
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = lines_before + data.count(b"\n", 0, exc.start) + 1
                raise IngestError(f"invalid UTF-8 in {label} line {line} (byte {offset + exc.start})") from None
            lines = text.split("\n")
            if lines[-1] == "":
                lines.pop()
            lines_before += len(lines)
            offset += len(data)
            yield lines
            if not block:
                return


def _line_batches(path: Path, label: str, size: int) -> Iterator[pa.Array]:
    """One couplet half per line, separator spaces removed, in arrays of exactly `size` lines (the last one shorter)."""
    pending: list[str] = []
    for lines in _raw_lines(path, label):
        pending += lines
        while len(pending) >= size:
            batch, pending = pending[:size], pending[size:]
            yield pc.replace_substring_regex(pa.array(batch, pa.string()), SEPARATORS_REGEX, "")
    if pending:
        yield pc.replace_substring_regex(pa.array(pending, pa.string()), SEPARATORS_REGEX, "")


def count_lines(path: Path, label: str) -> int:
    """The file's number of lines, checking its UTF-8 on the way."""
    return sum(len(lines) for lines in _raw_lines(path, label))


def read_lines(path: Path, label: str) -> pa.Array:
    """One couplet half per line, separator spaces removed. Invalid UTF-8 names the file and line."""
    batches = list(_line_batches(path, label, BATCH_LINES))
    return pa.concat_arrays(batches) if batches else pa.array([], pa.string())


def iter_pairs(layout_dir: Path, batch_lines: int = BATCH_LINES) -> Iterator[pa.Table]:
    """The four layout files as tables of pairs (`split`, `line_no`, `up`, `down`), train then test, a batch at a time.

    Errors are those of reading each file whole, in the same order: invalid UTF-8 in a split's in.txt, then
    in its out.txt, then in/out line counts that differ.
    """
    for split in SPLITS:
        up_label, down_label = DATASET_LAYOUT.upper_file(split), DATASET_LAYOUT.lower_file(split)
        up_path, down_path = layout_dir / up_label, layout_dir / down_label
        ups, downs = _line_batches(up_path, up_label, batch_lines), _line_batches(down_path, down_label, batch_lines)
        line_no = 0
        while True:
            up = next(ups, None)
            try:
                down = next(downs, None)
            except IngestError:
                count_lines(up_path, up_label)  # an error in in.txt comes first
                raise
            if up is None and down is None:
                break
            if up is None or down is None or len(up) != len(down):
                n_up, n_down = count_lines(up_path, up_label), count_lines(down_path, down_label)
                raise IngestError(f"{up_label} has {n_up} lines but {down_label} has {n_down}")
            n = len(up)
            yield pa.table(
                {
                    "split": pa.array([split] * n, pa.string()),
                    "line_no": pa.array(range(line_no + 1, line_no + n + 1), pa.int32()),
                    "up": up,
                    "down": down,
                },
                schema=PAIRS_SCHEMA,
            )
            line_no += n


def parse_pairs(layout_dir: Path) -> pa.Table:
    """Parse the four layout files into one table (`split`, `line_no`, `up`, `down`)."""
    table = pa.concat_tables(list(iter_pairs(layout_dir)) or [PAIRS_SCHEMA.empty_table()])
    if table.num_rows == 0:
        raise IngestError("dataset is empty: no lines in train or test")
    return table


def write_pairs(layout_dir: Path, path: Path) -> dict[str, int]:
    """Parse the layout files into `path` (Parquet) a batch at a time; returns the rows per split."""
    rows = {split: 0 for split in SPLITS}
    # one chunk per split in each row group, as when the table was parsed whole: the same bytes
    with RowGroupWriter(path, PAIRS_SCHEMA, combine=True) as writer:
        for table in iter_pairs(layout_dir):
            split = table["split"][0].as_py()
            rows[split] += table.num_rows
            writer.write(table, key=split)
    if not sum(rows.values()):
        raise IngestError("dataset is empty: no lines in train or test")
    return rows


def ingest_key(sha256: str) -> str:
    """The ingest stage's cache key for a source with this sha256."""
    return stage_key("ingest", sha256)


def run_ingest(cfg: DataConfig, home: Path, force: bool = False, progress: bool = True) -> dict:
    """Stage 1. Returns a small manifest: status, key, raw sha256, paths (absolute) and counts."""
    start = time.perf_counter()
    raw, raw_cached = fetch_raw(cfg, home, progress=progress)
    key = ingest_key(raw.sha256)
    catalog = Catalog(home)
    out_dir = catalog.stage_dir("ingest", key)

    def produce(folder: Path) -> dict:
        rows_per_split = write_pairs(raw.layout_dir, folder / INGEST_FILES.pairs)
        return {
            "dataset_version": raw.sha256[:12],
            "raw_sha256": raw.sha256,
            "raw_dir": catalog.relative(raw.root),
            "source": cfg.source,
            "raw_cached": raw_cached,
            "rows": sum(rows_per_split.values()),
            "rows_per_split": rows_per_split,
            "line_counts": raw.manifest["line_counts"],
            "pairs_path": catalog.relative(out_dir / INGEST_FILES.pairs),
        }

    # the manifest names paths relative to the home; the caller gets them under the current home
    return catalog.resolved(run_cached("ingest", key, out_dir, produce, force=force, started=start), ("raw_dir", "pairs_path"))
