"""Training data: read a build directory's length shards and serve equal-length batches.

A build directory (docs/design.md, "Build output"; its file names: `catalog.BUILD_FILES`) holds its
manifest, the vocabulary and one Parquet shard per (split, length) with `up_ids` / `down_ids` list<int32> columns. Every batch holds couplets of a
single length, so no padding is ever needed in training.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from couplet.data.build import read_build_manifest

Buckets = dict[int, tuple[np.ndarray, np.ndarray]]  # length -> (up_ids (N, L) int64, down_ids (N, L) int64)
# with_swaps: length -> (input ids (N, L), target ids (N, L), direction (N,)), all int64
DirectedBuckets = dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
# load_split(..., tags=True) adds (up_tags, down_tags) (N, L) int64 to each length's columns (model.word_features), and
# with_swaps / one_way then end each length's columns with the input line's tags (N, L)
DOWN, UP = 0, 1  # directions: upper -> lower (the dataset's), lower -> upper (a swapped pair)


def _ids_matrix(column, rows: int, length: int, where: str) -> np.ndarray:
    """A list<int32> column whose lists all have `length` items -> (rows, length) int64, no Python loop."""
    flat = pc.list_flatten(column).to_numpy()  # respects chunk offsets, unlike .values
    if flat.size != rows * length:
        raise ValueError(f"{where}: expected {rows} rows of {length} ids, got {flat.size} ids in all")
    return flat.astype(np.int64).reshape(rows, length)


def load_split(build_dir: str | Path, split: str, max_len: int | None = None, tags: bool = False) -> Buckets:
    """All couplets of one split, grouped by length: {length: (up_ids (N, L), down_ids (N, L))}, int64.

    Couplets longer than `max_len` are dropped (the seed trains on lines of at most 16 characters). `tags`: also
    each line's word tags, {length: (up_ids, down_ids, up_tags, down_tags)} (`load_tags`).
    """
    if tags:
        return load_tags(build_dir, split, max_len)
    build_dir = Path(build_dir)
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for shard in read_build_manifest(build_dir)["shards"]:
        length = int(shard["length"])
        if shard["split"] != split or (max_len is not None and length > max_len):
            continue
        table = pq.read_table(build_dir / shard["path"], columns=["up_ids", "down_ids"])
        where = f"{build_dir / shard['path']}"
        up = _ids_matrix(table.column("up_ids"), table.num_rows, length, where)
        down = _ids_matrix(table.column("down_ids"), table.num_rows, length, where)
        if table.num_rows:
            parts.setdefault(length, []).append((up, down))
    return {
        length: (np.concatenate([u for u, _ in chunks]), np.concatenate([d for _, d in chunks]))
        for length, chunks in sorted(parts.items())
    }


def load_tags(build_dir: str | Path, split: str, max_len: int | None = None) -> Buckets:
    """`load_split` with each line's word tags (data.word_tags; couplet/data/wordtags.py) after the ids:
    {length: (up_ids, down_ids, up_tags, down_tags)}, int64. A shard written without them (one from before the
    field, or a split the build does not tag) is tagged here from its text, the same way."""
    from couplet.data.wordtags import tag_matrix

    build_dir = Path(build_dir)
    ids = load_split(build_dir, split, max_len)
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for shard in read_build_manifest(build_dir)["shards"]:
        length = int(shard["length"])
        if shard["split"] != split or length not in ids:
            continue
        path = build_dir / shard["path"]
        if {"up_tags", "down_tags"} <= set(pq.read_schema(path).names):
            table = pq.read_table(path, columns=["up_tags", "down_tags"])
            up, down = (_ids_matrix(table.column(c), table.num_rows, length, str(path)) for c in ("up_tags", "down_tags"))
        else:
            table = pq.read_table(path, columns=["up", "down"])
            up, down = (tag_matrix(table.column(c).to_pylist(), length).astype(np.int64) for c in ("up", "down"))
        if table.num_rows:
            parts.setdefault(length, []).append((up, down))
    return {length: (*ids[length], *(np.concatenate(c) for c in zip(*parts[length]))) for length in ids}


def one_way(buckets: Buckets) -> DirectedBuckets:
    """Tagged buckets (`load_tags`) without swaps: (up_ids, down_ids, direction DOWN, up_tags) per length."""
    return {length: (up, down, np.full(len(up), DOWN, np.int64), up_tags) for length, (up, down, up_tags, _) in buckets.items()}


def count_rows(buckets: Buckets | DirectedBuckets) -> int:
    return sum(len(columns[0]) for columns in buckets.values())


def with_swaps(buckets: Buckets) -> DirectedBuckets:
    """Each length's pairs followed by their swaps (lower line in, upper line out), with a direction column:
    DOWN for the pairs, UP for the swaps (train.swapped_pairs)."""
    out = {}
    for length, (up, down, *tags) in buckets.items():
        direction = np.concatenate([np.full(len(up), DOWN, np.int64), np.full(len(up), UP, np.int64)])
        out[length] = (np.concatenate([up, down]), np.concatenate([down, up]), direction, *_swapped_tags(tags))
    return out


def _swapped_tags(tags: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """The input line's tags of with_swaps' rows, from a tagged bucket's (up_tags, down_tags); none untagged."""
    return (np.concatenate(tags),) if tags else ()


class LengthBucketBatches:
    """Equal-length batches of `batch_size` couplets, in a random order that is a pure function of (seed, epoch).

    Each epoch, every length's rows are shuffled and cut into ceil(n / batch_size) batches (the last one
    topped up from a fresh shuffle, so every batch is full and every row is seen at least once); the batches
    of all lengths are then shuffled together, so a length comes up in proportion to its count (the seed's
    recipe). One epoch is about total_rows / batch_size batches.

    Iterating yields the rest of the current epoch as (up, down) int64 tensors of shape (batch_size, L) and
    then moves to the next epoch; from `with_swaps` buckets, (up, down, direction) with direction (batch_size,),
    a batch mixing directions. `state_dict()` / `load_state_dict()` give exact resume: (epoch, position).

    `extra` (the build's extra split, data.extra_source; the same columns as `buckets`) with `extra_share` > 0: each
    epoch also draws a fresh random sample of the extra rows, the same fraction of every length's, sized so that they
    are `extra_share` of the epoch's rows (at most all of them); they mix into the same length's batches.
    """

    def __init__(self, buckets: Buckets | DirectedBuckets, batch_size: int, seed: int = 0,
                 extra: Buckets | DirectedBuckets | None = None, extra_share: float = 0.0):
        if not buckets:
            raise ValueError("no couplets to batch (empty split, or every line longer than max_len)")
        self.primary_rows = {length: len(columns[0]) for length, columns in buckets.items()}
        self.extra_fraction = 0.0  # of each length's extra rows drawn per epoch
        if extra and extra_share > 0:
            self.extra_fraction = min(1.0, extra_share / (1 - extra_share) * count_rows(buckets) / count_rows(extra))
            buckets = {length: tuple(np.concatenate(parts) for parts in zip(*(b[length] for b in (buckets, extra) if length in b)))
                       for length in sorted(set(buckets) | set(extra))}
        self.buckets = {length: tuple(torch.from_numpy(c) for c in columns) for length, columns in buckets.items()}
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    def __len__(self) -> int:
        return sum(math.ceil(self._pool_size(length) / self.batch_size) for length in self.buckets)

    def _pool_size(self, length: int) -> int:
        """Rows of this length in each epoch: the primary ones and the extra sample."""
        primary = self.primary_rows.get(length, 0)
        return primary + round(self.extra_fraction * (len(self.buckets[length][0]) - primary))

    def _pool(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """The epoch's rows of this length: every primary row (first in the bucket), then the extra sample."""
        n, primary = len(self.buckets[length][0]), self.primary_rows.get(length, 0)
        if primary == n:  # no extra rows of this length: draws nothing, so plans without extra rows are as before
            return np.arange(n)
        sample = np.sort(rng.permutation(n - primary)[:self._pool_size(length) - primary])
        return np.concatenate([np.arange(primary), primary + sample])

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches as (length, row indices); depends only on (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for length in sorted(self.buckets):
            pool = self._pool(length, rng)
            n = len(pool)
            if not n:
                continue
            n_batches = math.ceil(n / self.batch_size)
            need = n_batches * self.batch_size
            order = np.concatenate([pool[rng.permutation(n)] for _ in range(math.ceil(need / n))])[:need]
            batches += [(length, idx) for idx in order.reshape(n_batches, self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        plan = self.plan(self.epoch)
        while self.position < len(plan):
            length, idx = plan[self.position]
            self.position += 1  # counted before yielding: a checkpoint after this step resumes with the next
            rows = torch.from_numpy(idx)
            yield tuple(c.index_select(0, rows) for c in self.buckets[length])  # (batch_size, L) each (+ (batch_size,))
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(f"batch state is for seed/batch_size {state['seed']}/{state['batch_size']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
