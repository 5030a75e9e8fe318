"""Stage 1 — ingest: fetch the couplet dataset into the immutable raw layer (couplet/raw.py) and
parse it. The parsed pairs go to `data/processed/ingest/<key>/pairs.parquet` with columns `split`,
`line_no`, `up`, `down`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from couplet.catalog import Catalog
from couplet.config import DataConfig
from couplet.raw import SPLITS, IngestError, fetch_raw
from couplet.stage import run_cached, stage_key

# Separators the raw files put between characters (and stray ones we tolerate): ASCII space, tab,
# ideographic space, and a BOM that some editors leave at the start of a file.
SEPARATORS_REGEX = "[ \t\r\u3000\ufeff]"


# --------------------------------------------------------------------------- parsing


def read_lines(path: Path, label: str) -> pa.Array:
    """One couplet half per line, separator spaces removed. Invalid UTF-8 names the file and line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise IngestError(f"invalid UTF-8 in {label} line {line} (byte {exc.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return pc.replace_substring_regex(pa.array(lines, pa.string()), SEPARATORS_REGEX, "")


def parse_pairs(layout_dir: Path) -> pa.Table:
    """Parse the four layout files into a table (`split`, `line_no`, `up`, `down`)."""
    tables = []
    for split in SPLITS:
        up = read_lines(layout_dir / split / "in.txt", f"{split}/in.txt")
        down = read_lines(layout_dir / split / "out.txt", f"{split}/out.txt")
        if len(up) != len(down):
            raise IngestError(f"{split}/in.txt has {len(up)} lines but {split}/out.txt has {len(down)}")
        tables.append(
            pa.table(
                {
                    "split": pa.array([split] * len(up), pa.string()),
                    "line_no": pa.array(range(1, len(up) + 1), pa.int32()),
                    "up": up,
                    "down": down,
                }
            )
        )
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise IngestError("dataset is empty: no lines in train or test")
    return table


def run_ingest(cfg: DataConfig, home: Path, force: bool = False, progress: bool = True) -> dict:
    """Stage 1. Returns a small manifest: status, key, raw sha256, paths (absolute) and counts."""
    start = time.perf_counter()
    raw, raw_cached = fetch_raw(cfg, home, progress=progress)
    key = stage_key("ingest", raw.sha256)
    catalog = Catalog(home)
    out_dir = catalog.stage_dir("ingest", key)

    def produce(folder: Path) -> dict:
        table = parse_pairs(raw.layout_dir)
        pq.write_table(table, folder / "pairs.parquet", compression="zstd", version="2.6")
        return {
            "dataset_version": raw.sha256[:12],
            "raw_sha256": raw.sha256,
            "raw_dir": catalog.relative(raw.root),
            "source": cfg.source,
            "raw_cached": raw_cached,
            "rows": table.num_rows,
            "rows_per_split": {split: int(pc.sum(pc.equal(table["split"], split)).as_py() or 0) for split in SPLITS},
            "line_counts": raw.manifest["line_counts"],
            "pairs_path": catalog.relative(out_dir / "pairs.parquet"),
        }

    # the manifest names paths relative to the home; the caller gets them under the current home
    return catalog.resolved(run_cached("ingest", key, out_dir, produce, force=force, started=start), ("raw_dir", "pairs_path"))
