"""Stage 3 — build: deterministic splits, the character vocabulary and length-grouped Parquet shards.

- The dataset's test split stays test. Its train split is divided into train/valid by a stable hash
  of the pair, so re-runs and appended data never move a pair between splits.
- Exact duplicate pairs are removed; a pair that is in test is removed from train/valid.
- The vocabulary counts characters of the train split only.
- Each shard holds one split and one line length, so training batches need no padding.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from couplet.catalog import Catalog
from couplet.config import DataConfig
from couplet.stage import run_cached, stage_key
from couplet.vocab import Vocab

SPLITS = ("train", "valid", "test")
ROW_GROUP = 65_536
HASH_BUCKETS = 1_000_000

# How the stage runs its partitions (one per line length): `partitions(fn, calls)` returns
# `[fn(*args) for args in calls]`, in order, computed wherever it likes (flows/pipeline.py submits each
# call as a Prefect task: threads, or Dask workers). None: here, one by one.
Partitions = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def _map(partitions: Partitions | None, fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
    return partitions(fn, calls) if partitions is not None else [fn(*call) for call in calls]


def build_key(validate_key: str, cfg: DataConfig) -> str:
    return stage_key("build", validate_key, cfg.min_count, cfg.valid_fraction)


FNV_OFFSET, FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def codepoints(column: pa.ChunkedArray | pa.Array, length: int) -> np.ndarray:
    """(N, length) uint32 Unicode codepoints of N strings that all have exactly `length` characters."""
    return column.to_numpy(zero_copy_only=False).astype(f"<U{length}").view(np.uint32).reshape(-1, length)


def pair_hash(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """A stable 64-bit hash of each (up, down) pair from their codepoint rows.

    FNV-1a over the codepoints of `up` then `down`, finished with the splitmix64 mixer so that
    `hash % n` is uniform. It depends only on the text, never on the process or library versions.
    """
    h = np.full(len(up), FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in (*up.T, *down.T):
            h ^= column.astype(np.uint64)
            h *= FNV_PRIME
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def first_occurrences(hashes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row (hash-grouped, then checked exactly)."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    representative = first[inverse]
    # A 64-bit collision would make two different pairs look equal: keep any row that differs
    # from its representative.
    keep = (representative == np.arange(len(rows))) | np.any(rows != rows[representative], axis=1)
    return np.flatnonzero(keep)


def split_length_group(table: pa.Table, length: int, valid_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Dedupe one length group and assign splits. Returns split -> (row indices into `table`, up codepoints, down codepoints)."""
    up, down = codepoints(table["up"], length), codepoints(table["down"], length)
    rows = np.concatenate([up, down], axis=1)
    hashes = pair_hash(up, down)
    is_test = (table["split"].to_numpy(zero_copy_only=False) == "test")
    test_idx = np.flatnonzero(is_test)
    test_idx = test_idx[first_occurrences(hashes[test_idx], rows[test_idx])]
    train_idx = np.flatnonzero(~is_test)
    train_idx = train_idx[first_occurrences(hashes[train_idx], rows[train_idx])]
    # drop train pairs that also appear in test (same hash and same text)
    in_test = np.isin(hashes[train_idx], hashes[test_idx])
    if in_test.any():
        test_rows = {rows[i].tobytes() for i in test_idx[np.isin(hashes[test_idx], hashes[train_idx])]}
        in_test[in_test] = [rows[i].tobytes() in test_rows for i in train_idx[in_test]]
        train_idx = train_idx[~in_test]
    is_valid = (hashes[train_idx] % np.uint64(HASH_BUCKETS)) < np.uint64(round(valid_fraction * HASH_BUCKETS))
    out = {}
    for split, idx in (("train", train_idx[~is_valid]), ("valid", train_idx[is_valid]), ("test", test_idx)):
        out[split] = (idx, up[idx], down[idx])
    return out


def char_counts(up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct codepoints of both lines (ascending) and how often each occurs."""
    return np.unique(np.concatenate([up.ravel(), down.ravel()]), return_counts=True)


def vocab_from_counts(group_counts: list[tuple[np.ndarray, np.ndarray]], min_count: int) -> Vocab:
    """Per-group character counts of the train split (`char_counts`) -> Vocab."""
    counts = Counter()
    for values, n in group_counts:
        for cp, c in zip(values.tolist(), n.tolist()):
            counts[chr(cp)] += c
    return Vocab.from_counts(counts, min_count=min_count)


def _list_column(ids: np.ndarray) -> pa.ListArray:
    n, length = ids.shape
    offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.int32()))


def shard_table(group: pa.Table, length: int, up_ids: np.ndarray, down_ids: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "up": group["up"],
            "down": group["down"],
            "length": pa.array(np.full(group.num_rows, length, dtype=np.int16)),
            "up_ids": _list_column(up_ids),
            "down_ids": _list_column(down_ids),
        }
    )


def split_partition(group: pa.Table, length: int, valid_fraction: float) -> dict:
    """Partition step 1, one line length: dedupe and assign splits (`split_length_group`).

    Returns each split's row indices into `group` and the train split's character counts (`char_counts`).
    """
    parts = split_length_group(group, length, valid_fraction)
    return {"indices": {split: idx for split, (idx, _, _) in parts.items()}, "train_counts": char_counts(*parts["train"][1:])}


def shard_partition(group: pa.Table, length: int, indices: dict[str, np.ndarray], vocab: Vocab) -> list[dict]:
    """Partition step 2, one line length: encode each split's rows and serialise its shard.

    Returns per non-empty split the rows, the UNK count of the upper lines and the shard's Parquet
    bytes; the caller writes them (so only the stage's own process writes into its folder).
    """
    shards = []
    for split in SPLITS:
        idx = indices[split]
        if not len(idx):
            continue
        rows = group.take(pa.array(idx))
        up_ids = vocab.encode_codepoints(codepoints(rows["up"], length))
        down_ids = vocab.encode_codepoints(codepoints(rows["down"], length))
        sink = pa.BufferOutputStream()
        pq.write_table(shard_table(rows, length, up_ids, down_ids), sink, compression="zstd", version="2.6", row_group_size=ROW_GROUP)
        shards.append({"split": split, "rows": len(idx), "unk": int(np.count_nonzero(up_ids == 1)), "parquet": sink.getvalue().to_pybytes()})
    return shards


def run_build(validated: dict, cfg: DataConfig, home: Path, force: bool = False, partitions: Partitions | None = None) -> dict:
    """Stage 3. Returns a small manifest: status, key, counts, paths (absolute).

    `partitions` runs the per-length work (see `Partitions`); the vocabulary is merged and every file
    written here, into the stage's temporary folder.
    """
    key = build_key(validated["key"], cfg)
    catalog = Catalog(home)
    out_dir = catalog.stage_dir("build", key)
    validated = catalog.resolved(validated, ("passed_path",))
    result = run_cached("build", key, out_dir, lambda folder: _build_into(folder, catalog.relative(out_dir), validated, cfg, partitions),
                        force=force)
    return catalog.resolved(result, ("build_dir",))  # recorded relative to the home; the caller gets it under the current home


def _build_into(folder: Path, recorded_dir: str, validated: dict, cfg: DataConfig, partitions: Partitions | None = None) -> dict:
    """Dedupe, split, build the vocabulary and write one shard per split and length into `folder`.

    Two rounds of partitions, one per line length: split (and count the train characters), then,
    with the vocabulary of all of them, encode and serialise the shards; the files are written here.
    """
    pairs = pq.read_table(validated["passed_path"], columns=["split", "up", "down"])
    rows_in = pairs.num_rows
    line_lengths = pc.utf8_length(pairs["up"])
    groups = {length: pairs.filter(pc.equal(line_lengths, length)) for length in sorted(pc.unique(line_lengths).to_pylist())}
    del pairs, line_lengths
    splits = _map(partitions, split_partition, [(group, length, cfg.valid_fraction) for length, group in groups.items()])
    vocab = vocab_from_counts([part["train_counts"] for part in splits], cfg.min_count)
    encoded = _map(partitions, shard_partition,
                   [(group, length, part["indices"], vocab) for (length, group), part in zip(groups.items(), splits)])

    shards, counts, lengths, unk = [], {s: 0 for s in SPLITS}, {s: {} for s in SPLITS}, {s: 0 for s in SPLITS}
    vocab.save(folder / "vocab.json")
    for split in SPLITS:
        (folder / split).mkdir()
    for length, parts in zip(groups, encoded):
        for part in parts:
            split = part["split"]
            rel = f"{split}/len-{length:02d}.parquet"
            (folder / rel).write_bytes(part["parquet"])
            shards.append({"split": split, "length": length, "rows": part["rows"], "path": rel,
                           "sha256": hashlib.sha256(part["parquet"]).hexdigest()})
            counts[split] += part["rows"]
            lengths[split][str(length)] = part["rows"]
            unk[split] += part["unk"]
    return {
        "dataset_version": validated["dataset_version"],
        "validate_key": validated["key"],
        "vocab_size": len(vocab),
        "rows_in": rows_in,
        "duplicates_removed": rows_in - sum(counts.values()),
        "counts": counts,
        "lengths": lengths,
        "unk_in_upper": unk,
        "shards": shards,
        "params": {"min_count": cfg.min_count, "valid_fraction": cfg.valid_fraction},
        "build_dir": recorded_dir,  # relative to the home
    }


def read_split_text(build_dir: str | Path, split: str) -> tuple[list[str], list[str]]:
    """Upper and lower lines of one split of a build, shard by shard in length order."""
    build_dir = Path(build_dir)
    manifest = json.loads((build_dir / "manifest.json").read_text(encoding="utf-8"))
    uppers: list[str] = []
    lowers: list[str] = []
    for shard in sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: s["length"]):
        table = pq.read_table(build_dir / shard["path"], columns=["up", "down"])
        uppers += table["up"].to_pylist()
        lowers += table["down"].to_pylist()
    return uppers, lowers
