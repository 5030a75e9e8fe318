"""Stage 3 — build: deterministic splits, the character vocabulary and length-grouped Parquet shards.

- The dataset's test split stays test. Its train split is divided into train/valid by a stable hash
  of the unordered pair, so re-runs and appended data never move a pair between splits, and a pair and its
  swap (lower, upper) always land in the same split (training may add each pair's swap: train.swapped_pairs).
- Exact duplicate pairs are removed; a pair that is in test, or whose swap is, is removed from train/valid.
- The vocabulary counts characters of the train split only.
- Each shard holds one split and one line length, so training batches need no padding.
- The stage streams passed.parquet (see "partitions" below): memory holds a few batches, one hash
  bucket and the vocabulary; the pairs are spilled to temporary files in the stage's folder.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from couplet.core.catalog import BUILD_FILES, Catalog
from couplet.core.config import DataConfig
from couplet.core.stage import file_sha256, read_stage_manifest, run_cached, stage_key
from couplet.data.extra import fetch_extra, write_extra_shards
from couplet.data.raw import RawDataset
from couplet.data.streaming import HashSpill, RowGroupWriter, parquet_rows, read_batches
from couplet.data.vocab import Vocab

SPLITS = ("train", "valid", "test")
ROW_GROUP = 65_536
HASH_BUCKETS = 1_000_000
BATCH_ROWS = 250_000  # rows of passed.parquet read at a time
SPILL_ROWS = 1 << 19  # rows per hash bucket of the dedupe (one partition each)
WINDOW = 2  # partitions in flight at once

# How the stage runs its partitions (one per line length): `partitions(fn, calls)` returns
# `[fn(*args) for args in calls]`, in order, computed wherever it likes (flows/pipeline.py submits each
# call as a Prefect task: threads, or Dask workers). None: here, one by one.
Partitions = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def _map(partitions: Partitions | None, fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
    return partitions(fn, calls) if partitions is not None else [fn(*call) for call in calls]


def build_key(validate_key: str, cfg: DataConfig, extra_sha256: str | None = None) -> str:
    """The build's cache key; with an extra source (data.extra_source, couplet/data/extra.py) also its sha256 and
    the max_len its pairs are filtered with (without one, the key is as before the extra source existed)."""
    extra = () if extra_sha256 is None else (extra_sha256, cfg.max_len)
    return stage_key("build", validate_key, cfg.min_count, cfg.valid_fraction, *extra, *_word_tags_key(cfg))


def _word_tags_key(cfg: DataConfig) -> tuple:
    """data.word_tags in the build key when on (off: the key as before the field existed)."""
    return ("word_tags",) if cfg.word_tags else ()


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


def unordered(up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's two codepoint rows in a canonical order, the lexicographically smaller first: (A, B) and (B, A)
    give the same (first, second)."""
    differs = up != down  # (N, L)
    first = differs.argmax(axis=1)  # the first differing position (0 where the lines are equal)
    rows = np.arange(len(up))
    swap = up[rows, first] > down[rows, first]  # (N,)
    return np.where(swap[:, None], down, up), np.where(swap[:, None], up, down)


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


def _list_column(ids: np.ndarray, item: pa.DataType = pa.int32()) -> pa.ListArray:
    n, length = ids.shape
    offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), item))


SHARD_SCHEMA = pa.schema([("up", pa.string()), ("down", pa.string()), ("length", pa.int16()),
                          ("up_ids", pa.list_(pa.int32())), ("down_ids", pa.list_(pa.int32()))])


# data.word_tags: each line's jieba word tags per character (couplet/data/wordtags.py), after the ids
TAG_COLUMNS = (("up_tags", pa.list_(pa.int8())), ("down_tags", pa.list_(pa.int8())))
TAGGED_SCHEMA = pa.schema([*SHARD_SCHEMA, *(pa.field(name, kind) for name, kind in TAG_COLUMNS)])


def with_word_tags(table: pa.Table, length: int) -> pa.Table:
    """A shard table with its lines' word tags appended (`up_tags`, `down_tags`: list<int8>, one per character)."""
    from couplet.data.wordtags import tag_matrix

    for (name, _), line in zip(TAG_COLUMNS, ("up", "down")):
        table = table.append_column(name, _list_column(tag_matrix(table[line].to_pylist(), length), pa.int8()))
    return table


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


# --------------------------------------------------------------------------- partitions
#
# The build streams: it never holds the pairs whole. Its three rounds of partitions:
#   1. dedupe_partition, per hash bucket of the pairs (spilled to disk by a hash of the unordered pair text, so
#      equal pairs and swapped ones share a bucket): which rows to keep;
#   2. split_partition, per batch of the kept rows in their order: each row's split and line length, and the
#      train split's character counts (merged into the vocabulary);
#   3. shard_partition, per batch of one (split, length): the ids with the merged vocabulary. This round runs
#      here, in the stage's process, which compresses and writes the shards: a task run per batch of a shard
#      costs more than encoding it (a vocabulary lookup).
# Rows keep their order throughout, so every shard holds its rows in the order of passed.parquet.


def dedupe_partition(bucket: pa.Table, index: int) -> np.ndarray:
    """Round 1, one hash bucket (columns `row`, `is_test`, `up`, `down`): the rows to keep, ascending.

    Each distinct test pair keeps its first row; each other distinct pair keeps its first row unless the
    pair or its swap (down, up) is in test. Pairs are compared by their text, exactly.
    """
    is_test = bucket["is_test"]
    firsts = []
    test_keys = None
    for part in (bucket.filter(is_test), bucket.filter(pc.invert(is_test))):
        first = part.group_by(["up", "down"], use_threads=False).aggregate([("row", "min")])
        if test_keys is None:
            test_keys = first.select(["up", "down"])
        elif test_keys.num_rows and first.num_rows:
            swapped = pa.table({"up": test_keys["down"], "down": test_keys["up"]})
            for keys in (test_keys, swapped):
                first = first.join(keys, keys=["up", "down"], join_type="left anti", use_threads=False)
        firsts.append(first["row_min"].to_numpy())
    return np.sort(np.concatenate(firsts).astype(np.int64))


def split_partition(batch: pa.Table, index: int, valid_fraction: float) -> dict:
    """Round 2, one batch of kept rows (columns `split`, `up`, `down`): per (split, line length) the row
    positions in the batch, and the train rows' character counts (`char_counts`)."""
    lengths = pc.utf8_length(batch["up"]).to_numpy(zero_copy_only=False)
    is_test = batch["split"].to_numpy(zero_copy_only=False) == "test"
    rows: dict[tuple[str, int], np.ndarray] = {}
    counts = []
    for length in np.unique(lengths).tolist():
        idx = np.flatnonzero(lengths == length)
        group = batch.take(pa.array(idx))
        up, down = codepoints(group["up"], length), codepoints(group["down"], length)
        hashes = pair_hash(*unordered(up, down))  # a pair and its swap: one hash, one split
        test = is_test[idx]
        valid = ~test & ((hashes % np.uint64(HASH_BUCKETS)) < np.uint64(round(valid_fraction * HASH_BUCKETS)))
        train = ~test & ~valid
        for split, mask in (("train", train), ("valid", valid), ("test", test)):
            if mask.any():
                rows[(split, length)] = idx[mask]
        if train.any():
            counts.append(char_counts(up[train], down[train]))
    return {"rows": rows, "train_counts": counts}


def shard_partition(rows: pa.Table, length: int, vocab: Vocab, word_tags: bool = False) -> dict:
    """Round 3, one batch of a (split, length) shard's rows (`up`, `down`): the shard's columns (with `word_tags`
    the tag columns too) and the number of unknown characters in the upper lines."""
    up_ids = vocab.encode_codepoints(codepoints(rows["up"], length))
    down_ids = vocab.encode_codepoints(codepoints(rows["down"], length))
    table = shard_table(rows, length, up_ids, down_ids)
    return {"table": with_word_tags(table, length) if word_tags else table, "unk": int(np.count_nonzero(up_ids == 1))}


def run_build(validated: dict, cfg: DataConfig, home: Path, force: bool = False, partitions: Partitions | None = None) -> dict:
    """Stage 3. Returns a small manifest: status, key, counts, paths (absolute).

    `partitions` runs the partitions (see `Partitions` and the three rounds above); the vocabulary is
    merged and every file written here, into the stage's temporary folder.
    """
    extra = fetch_extra(cfg, home)  # None without data.extra_source; its sha256 is part of the key
    key = build_key(validated["key"], cfg, extra.sha256 if extra else None)
    catalog = Catalog(home)
    out_dir = catalog.stage_dir("build", key)
    validated = catalog.resolved(validated, ("passed_path",))
    result = run_cached("build", key, out_dir,
                        lambda folder: _build_into(folder, catalog.relative(out_dir), validated, cfg, partitions, extra),
                        force=force)
    return catalog.resolved(result, ("build_dir",))  # recorded relative to the home; the caller gets it under the current home


def _windowed(partitions: Partitions | None, fn: Callable[..., Any], calls: Iterator[tuple]) -> Iterator[tuple[tuple, Any]]:
    """(call, result) for each call, in order, with at most WINDOW calls in flight at once."""
    window: list[tuple] = []
    for call in calls:
        window.append(call)
        if len(window) == WINDOW:
            yield from zip(window, _map(partitions, fn, window))
            window = []
    if window:
        yield from zip(window, _map(partitions, fn, window))


def _build_into(folder: Path, recorded_dir: str, validated: dict, cfg: DataConfig, partitions: Partitions | None = None,
                extra: RawDataset | None = None) -> dict:
    """Dedupe, split, build the vocabulary and write one shard per split and length into `folder`, reading
    passed.parquet a batch at a time; memory holds a few batches, one hash bucket and the vocabulary."""
    passed_path = validated["passed_path"]
    rows_in = parquet_rows(passed_path)
    spill_dir = folder / ".spill"
    try:
        # round 1: the pairs by hash bucket, then which rows to keep
        by_pair = HashSpill(spill_dir / "pairs", -(-rows_in // SPILL_ROWS), ["first", "second"])
        start = 0
        for batch in read_batches(passed_path, ["split", "up", "down"], BATCH_ROWS):
            rows = pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64))
            up, down = batch["up"], batch["down"]
            ordered = pc.less_equal(up, down)  # bucketed by the unordered pair: a pair and its swap share a bucket
            by_pair.add(pa.table({"row": rows, "is_test": pc.equal(batch["split"], "test"), "up": up, "down": down,
                                  "first": pc.if_else(ordered, up, down), "second": pc.if_else(ordered, down, up)}))
            start += batch.num_rows
        keep = np.zeros(rows_in, dtype=bool)  # one byte per row
        for _, kept in _windowed(partitions, dedupe_partition, ((table, i) for i, table in enumerate(by_pair.tables()))):
            keep[kept] = True

        # round 2: the kept rows' splits and lengths, spilled per (split, length); the train split's characters
        by_shard = HashSpill(spill_dir / "shards", 1, [])
        counts_of_train = []

        def kept_batches() -> Iterator[tuple]:
            start = 0
            for i, batch in enumerate(read_batches(passed_path, ["split", "up", "down"], BATCH_ROWS)):
                mask = keep[start:start + batch.num_rows]
                start += batch.num_rows
                yield batch.filter(pa.array(mask)), i, cfg.valid_fraction

        for (batch, _, _), part in _windowed(partitions, split_partition, kept_batches()):
            for (split, length), idx in part["rows"].items():
                by_shard.append((split, length), batch.select(["up", "down"]).take(pa.array(idx)))
            counts_of_train += part["train_counts"]
        vocab = vocab_from_counts(counts_of_train, cfg.min_count)
        del counts_of_train
        shards_spilled = sorted(by_shard.writers, key=lambda sl: (sl[1], SPLITS.index(sl[0])))
        by_shard.close()

        # round 3: encode and write each shard, a batch at a time
        shards, counts, lengths, unk = [], {s: 0 for s in SPLITS}, {s: {} for s in SPLITS}, {s: 0 for s in SPLITS}
        vocab.save(folder / BUILD_FILES.vocab)
        for split in SPLITS:
            (folder / split).mkdir()
        for split, length in shards_spilled:
            rel = BUILD_FILES.shard(split, length)
            n = 0
            schema = TAGGED_SCHEMA if cfg.word_tags else SHARD_SCHEMA
            with RowGroupWriter(folder / rel, schema, row_group_size=ROW_GROUP, combine=True) as writer:
                for batch in by_shard.batches((split, length)):
                    part = shard_partition(pa.Table.from_batches([batch]), length, vocab, cfg.word_tags)
                    writer.write(part["table"])
                    n += part["table"].num_rows
                    unk[split] += part["unk"]
            by_shard.path((split, length)).unlink()
            shards.append({"split": split, "length": length, "rows": n, "path": rel, "sha256": file_sha256(folder / rel)})
            counts[split] += n
            lengths[split][str(length)] = n
        added = _add_extra(folder, extra, vocab, shards, cfg)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    manifest = {
        "dataset_version": validated["dataset_version"],
        "validate_key": validated["key"],
        "vocab_size": len(vocab),
        "rows_in": rows_in,
        "duplicates_removed": rows_in - sum(counts.values()),
        "counts": counts,
        "lengths": lengths,
        "unk_in_upper": unk,
        "shards": shards,
        "params": {"min_count": cfg.min_count, "valid_fraction": cfg.valid_fraction, **({"word_tags": True} if cfg.word_tags else {})},
        "build_dir": recorded_dir,  # relative to the home
    }
    if added:  # the extra split (data.extra_source): its shards and rows, and what was kept and dropped
        manifest["shards"] += added["shards"]
        manifest["counts"]["extra"], manifest["lengths"]["extra"], manifest["unk_in_upper"]["extra"] = added["rows"], added["lengths"], 0
        manifest["extra"] = added["summary"]
    return manifest


def _add_extra(folder: Path, extra: RawDataset | None, vocab: Vocab, shards: list[dict], cfg: DataConfig) -> dict | None:
    """The extra source's shards written into `folder` (couplet/data/extra.py), or None without one."""
    if extra is None:
        return None

    def pair_hashes(up: pa.ChunkedArray, down: pa.ChunkedArray, length: int) -> np.ndarray:
        return pair_hash(*unordered(codepoints(up, length), codepoints(down, length)))

    def encode(rows: pa.Table, length: int) -> pa.Table:
        return shard_partition(rows, length, vocab, cfg.word_tags)["table"]

    return write_extra_shards(folder, extra, shards, cfg, pair_hashes, encode)


def read_build_manifest(build_dir: str | Path) -> dict:
    """A build folder's manifest: its key, vocabulary size, counts and `shards` (split, length, rows, path).
    FileNotFoundError when the folder is not a finished build, one line naming it."""
    return read_stage_manifest(build_dir)


def read_build_vocab(build_dir: str | Path) -> Vocab:
    """The vocabulary a build's shards are encoded with."""
    return Vocab.load(Path(build_dir) / BUILD_FILES.vocab)


def read_split_text(build_dir: str | Path, split: str) -> tuple[list[str], list[str]]:
    """Upper and lower lines of one split of a build, shard by shard in length order."""
    build_dir = Path(build_dir)
    manifest = read_build_manifest(build_dir)
    uppers: list[str] = []
    lowers: list[str] = []
    for shard in sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: s["length"]):
        table = pq.read_table(build_dir / shard["path"], columns=["up", "down"])
        uppers += table["up"].to_pylist()
        lowers += table["down"].to_pylist()
    return uppers, lowers
