"""A second training source (data.extra_source; issue 20, item 5b): more equal-length line pairs, down-weighted.

The build stage (couplet/data/build.py) brings the extra source into the raw layer as it does the primary one
(`data/raw/<name>-extra/<sha12>/`; a URL, a local .tar.gz or a directory in the dataset's layout) and adds the
extra dataset's train split to its folder as `extra/len-LL.parquet` shards, in the primary shards' columns.
What the extra pairs may not change:

- valid and test are the primary build's, pair for pair, so figures stay comparable with primary-only runs;
- the vocabulary is the primary train split's (the output layer does not grow).

So an extra pair is dropped when it breaks a validation row rule (couplet/data/validate.py, with data.max_len), when
it equals any primary pair as an unordered pair (train, valid or test: the extra rows are only new pairs, and no
valid/test pair or its swap reaches training), when it repeats an earlier extra pair (also as an unordered pair), or
when either line has a character outside the vocabulary (either line may be a target: train.swapped_pairs). Pairs are
compared by a 64-bit hash of the unordered pair (the build's `pair_hash`): a collision can only drop a pair, never keep one.

The extra pairs are held in memory while they are filtered (1.1M short pairs: a few hundred MB at most). Training
draws train.extra_share of each epoch's rows from them (couplet/data/batches.py, `LengthBucketBatches`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from couplet.core.catalog import BUILD_FILES
from couplet.core.config import DataConfig
from couplet.core.stage import file_sha256
from couplet.data.ingest import iter_pairs
from couplet.data.raw import IngestError, RawDataset, fetch_raw
from couplet.data.streaming import RowGroupWriter
from couplet.data.validate import add_rule_columns, rule_failures
from couplet.data.vocab import UNK

# what the build hands over (couplet/data/build.py imports this module, so not the other way):
PairHashes = Callable[[pa.ChunkedArray, pa.ChunkedArray, int], np.ndarray]  # (up, down, length) -> unordered-pair hashes
Encode = Callable[[pa.Table, int], pa.Table]  # (rows `up`, `down`; length) -> the shard's columns, ids included

EXTRA_SPLIT = "extra"  # the build's split of extra pairs: extra/len-LL.parquet
PRIMARY_SPLITS = ("train", "valid", "test")
ROW_GROUP = 65_536  # rows per row group, as in the primary shards


def extra_data_config(cfg: DataConfig) -> DataConfig:
    """The data settings the extra source is fetched with: its own raw folder, no pinned sha256."""
    return cfg.model_copy(update={"source": cfg.extra_source, "sha256": None, "name": f"{cfg.name}-extra"})


def fetch_extra(cfg: DataConfig, home: Path) -> RawDataset | None:
    """The extra source in the raw layer (None when data.extra_source is not set); an IngestError naming it, one line."""
    if not cfg.extra_source:
        return None
    try:
        raw, _ = fetch_raw(extra_data_config(cfg), home, progress=False)
    except (IngestError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IngestError(f"data.extra_source {cfg.extra_source}: {detail}") from None
    return raw


def _primary_hashes(folder: Path, shards: list[dict], pair_hashes: PairHashes) -> dict[str, dict[int, np.ndarray]]:
    """{split: {length: unordered-pair hashes}} of the primary shards already written into `folder`."""
    out: dict[str, dict[int, np.ndarray]] = {split: {} for split in PRIMARY_SPLITS}
    for shard in shards:
        table = pq.read_table(folder / shard["path"], columns=["up", "down"])
        out[shard["split"]][shard["length"]] = pair_hashes(table["up"], table["down"], shard["length"])
    return out


def _known(table: pa.Table, length: int) -> np.ndarray:
    """Per row of encoded shard columns: whether both lines are free of UNK."""
    ok = np.ones(table.num_rows, dtype=bool)
    for column in ("up_ids", "down_ids"):
        ok &= (pc.list_flatten(table[column]).to_numpy().reshape(-1, length) != UNK).all(axis=1)
    return ok


def _extra_train_pairs(layout_dir: Path, max_len: int) -> tuple[pa.Table, int, int]:
    """The extra dataset's train pairs that pass every validation row rule; (pairs, rows read, rows rejected)."""
    tables = [t.select(["up", "down"]) for t in iter_pairs(layout_dir) if t["split"][0].as_py() == "train"]
    table = pa.concat_tables(tables) if tables else pa.table({"up": pa.array([], pa.string()), "down": pa.array([], pa.string())})
    failures = rule_failures(add_rule_columns(table, max_len), max_len)
    bad = pa.array(np.zeros(table.num_rows, dtype=bool))
    for broken in failures.values():
        bad = pc.or_(bad, broken)
    kept = table.filter(pc.invert(bad))
    return kept, table.num_rows, table.num_rows - kept.num_rows


def write_extra_shards(folder: Path, extra: RawDataset, primary_shards: list[dict], cfg: DataConfig,
                       pair_hashes: PairHashes, encode: Encode) -> dict:
    """Filter the extra source's train pairs (module docstring) and write them as `extra/len-LL.parquet` shards in
    `folder`, next to the primary shards `primary_shards` (already written there), encoded as those are (`encode`:
    the build's vocabulary and columns). Returns the shards, the rows per length and a summary of what was kept and
    dropped, for the build manifest."""
    pairs, rows_in, rejected = _extra_train_pairs(extra.layout_dir, cfg.max_len)
    primary = _primary_hashes(folder, primary_shards, pair_hashes)
    dropped = {"rules": rejected, "in_primary_valid_test": 0, "in_primary_train": 0, "duplicates": 0, "unknown_chars": 0}
    lengths_all = pc.utf8_length(pairs["up"]).to_numpy(zero_copy_only=False)
    shards, lengths = [], {}
    (folder / EXTRA_SPLIT).mkdir(exist_ok=True)
    for length in np.unique(lengths_all).tolist():
        group = pairs.filter(pa.array(lengths_all == length))
        hashes = pair_hashes(group["up"], group["down"], length)
        keep = np.ones(len(hashes), dtype=bool)
        held_out = np.concatenate([primary[s].get(length, np.empty(0, np.uint64)) for s in ("valid", "test")])
        for reason, seen in (("in_primary_valid_test", held_out), ("in_primary_train", primary["train"].get(length))):
            if seen is not None and len(seen):
                hit = keep & np.isin(hashes, seen)
                dropped[reason] += int(hit.sum())
                keep &= ~hit
        first = np.zeros(len(hashes), dtype=bool)
        idx = np.flatnonzero(keep)
        first[idx[np.unique(hashes[idx], return_index=True)[1]]] = True  # the first row of each distinct pair
        dropped["duplicates"] += int((keep & ~first).sum())
        keep &= first
        if not keep.any():
            continue
        table = encode(group.filter(pa.array(keep)), length)
        known = _known(table, length)
        dropped["unknown_chars"] += int((~known).sum())
        table = table.filter(pa.array(known))
        if not table.num_rows:
            continue
        rel = BUILD_FILES.shard(EXTRA_SPLIT, length)
        with RowGroupWriter(folder / rel, table.schema, row_group_size=ROW_GROUP, combine=True) as writer:
            writer.write(table)
        shards.append({"split": EXTRA_SPLIT, "length": length, "rows": table.num_rows, "path": rel, "sha256": file_sha256(folder / rel)})
        lengths[str(length)] = table.num_rows
    kept = sum(lengths.values())
    summary = {"source": extra.manifest.get("source"), "sha256": extra.sha256, "rows_in": rows_in, "kept": kept, "dropped": dropped}
    return {"shards": shards, "lengths": lengths, "rows": kept, "summary": summary}
