"""Bounded-memory Parquet I/O for the data stages (ingest, validate, build).

The stages read and write their tables a batch at a time, so their memory depends on the batch size
and not on the number of rows:

- `read_batches(path, columns, rows)` yields a Parquet file as tables of exactly `rows` rows (the
  last one shorter), whatever the file's row groups are.
- `RowGroupWriter` takes a table in pieces and writes the file `pq.write_table(whole table)` writes:
  row groups of exactly `row_group_size` rows, each written as one contiguous chunk, so the bytes
  do not depend on how the pieces were cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq

# pq.write_table's row groups when no row_group_size is given (1Mi rows): the size every data-stage
# file had when it was written whole, kept so the files stay byte for byte what they were.
DEFAULT_ROW_GROUP = 1024 * 1024
PARQUET_OPTIONS = {"compression": "zstd", "version": "2.6"}


def read_batches(path: str | Path, columns: list[str] | None = None, rows: int = 250_000) -> Iterator[pa.Table]:
    """The file as consecutive tables of exactly `rows` rows (the last one shorter; one empty table for an empty file)."""
    # a buffered stream rather than whole column chunks read ahead: the row groups are 1Mi rows
    parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    pending: list[pa.Table] = []
    held = 0
    yielded = False
    for batch in parquet.iter_batches(batch_size=min(rows, 1 << 17), columns=columns, use_threads=False):
        pending.append(pa.Table.from_batches([batch]))
        held += batch.num_rows
        while held >= rows:
            table = pa.concat_tables(pending)
            yield table.slice(0, rows)
            yielded = True
            rest = table.slice(rows)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held or not yielded:
        schema = parquet.schema_arrow if columns is None else pa.schema([parquet.schema_arrow.field(c) for c in columns])
        yield pa.concat_tables(pending) if pending else schema.empty_table()


def create_file(path: Path):
    """A new, empty file opened for appending, as a Python file object.

    Writers get Python file objects rather than paths, so that a full disk raises OSError with its errno
    (ENOSPC), which `couplet.core.stage.run_cached` turns into its one-line error.
    """
    path = Path(path)
    path.write_bytes(b"")
    return open(path, "ab")


def parquet_rows(path: str | Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


class RowGroupWriter:
    """One Parquet file written from pieces, in row groups of exactly `row_group_size` rows.

    `write(table, key)` buffers at most one row group; `close()` writes the rest and returns the number
    of rows. A file that got no rows holds one empty row group, as `pq.write_table` of an empty table.

    Parquet's page boundaries depend on how a column is cut into chunks, so the writer keeps the chunks
    it is given (`combine=False`: the file is `pq.write_table` of the pieces concatenated), or, with
    `combine=True`, merges the consecutive pieces of a row group that have the same `key` into one chunk
    (the file is `pq.write_table` of a table whose column has one chunk per run of equal keys).
    """

    def __init__(self, where, schema: pa.Schema, row_group_size: int = DEFAULT_ROW_GROUP, combine: bool = False, **options):
        self.schema = schema
        self.row_group_size = row_group_size
        self.combine = combine
        self.file = create_file(where) if isinstance(where, (str, Path)) else None
        self.writer = pq.ParquetWriter(self.file or where, schema, **(PARQUET_OPTIONS | options))
        self.pending: list[tuple[pa.Table, object]] = []
        self.held = 0
        self.rows = 0
        self.groups = 0

    def write(self, table: pa.Table, key: object = None) -> None:
        if not table.num_rows:
            return
        self.pending.append((table.select(self.schema.names).cast(self.schema), key))
        self.held += table.num_rows
        while self.held >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, rows: int) -> None:
        pieces: list[tuple[pa.Table, object]] = []
        need = rows
        while need:
            table, key = self.pending.pop(0)
            if table.num_rows > need:
                self.pending.insert(0, (table.slice(need), key))
                table = table.slice(0, need)
            pieces.append((table, key))
            need -= table.num_rows
        if self.combine:
            runs: list[tuple[list[pa.Table], object]] = []
            for table, key in pieces:
                if runs and runs[-1][1] == key:
                    runs[-1][0].append(table)
                else:
                    runs.append(([table], key))
            group = pa.concat_tables([pa.concat_tables(tables).combine_chunks() for tables, _ in runs])
        else:
            group = pa.concat_tables([table for table, _ in pieces])
        self.writer.write_table(group, row_group_size=rows)
        self.rows += rows
        self.groups += 1
        self.held -= rows

    def close(self) -> int:
        if self.held:
            self._flush(self.held)
        if not self.groups:
            self.writer.write_table(self.schema.empty_table())
        self.writer.close()
        if self.file is not None:
            self.file.close()
        return self.rows

    def __enter__(self) -> "RowGroupWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:
            self.writer.close()
        finally:
            if self.file is not None:
                self.file.close()


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of each uint64."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(27))
        h = h * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def string_hash(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string, from its UTF-8 bytes, vectorised (no Python objects): the sum of each
    byte times a per-position multiplier, mixed with the length. Stable across processes and versions;
    good for spreading rows over buckets, not for telling strings apart (callers compare the text)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = pa.concat_arrays([array.cast(pa.string())])  # offset 0
    if not len(array):
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[: len(array) + 1].astype(np.int64)
    data = array.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8)[: offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    position = np.arange(len(data), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    multipliers = _mix(np.arange(int(lengths.max(initial=0)) + 1, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        terms = (data.astype(np.uint64) + np.uint64(1)) * multipliers[position]
        sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
        return _mix((sums[offsets[1:]] - sums[offsets[:-1]]) ^ lengths.astype(np.uint64))


def row_hash(table: pa.Table, columns: list[str]) -> np.ndarray:
    """A 64-bit hash of each row's values in `columns` (strings; see `string_hash`)."""
    h = np.zeros(table.num_rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in columns:
            h = _mix(h * np.uint64(0x100000001B3) ^ string_hash(table[name]))
    return h


class HashSpill:
    """Rows spilled to `buckets` files on disk by a hash of their `key` columns, so that every group of rows
    with equal keys lands in one bucket: exact grouping (dedupe, distinct counts) one bucket at a time.

    `add(table)` appends (in order: within a bucket, rows keep the order they were added in); `tables()`
    closes the files and yields each bucket as one table. The files live in `folder`, which the caller removes.
    """

    def __init__(self, folder: Path, buckets: int, key: list[str]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.buckets = max(1, buckets)
        self.key = key
        self.writers: dict[object, pa.ipc.RecordBatchStreamWriter] = {}
        self.files: dict[object, object] = {}
        self.schema: pa.Schema | None = None

    def path(self, bucket: object) -> Path:
        name = "-".join(str(part) for part in bucket) if isinstance(bucket, tuple) else f"{bucket:05d}"
        return self.folder / f"bucket-{name}.arrow"

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.schema = self.schema or table.schema
        bucket = (row_hash(table, self.key) % np.uint64(self.buckets)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        sorted_buckets = bucket[order]
        bounds = np.searchsorted(sorted_buckets, np.arange(self.buckets + 1))
        taken = table.take(pa.array(order))
        for b in np.flatnonzero(np.diff(bounds)):
            part = taken.slice(bounds[b], bounds[b + 1] - bounds[b])
            self.append(int(b), part)

    def append(self, bucket: object, table: pa.Table) -> None:
        """Append `table` to one bucket's file (the caller chose the bucket)."""
        if bucket not in self.writers:
            self.files[bucket] = create_file(self.path(bucket))
            self.writers[bucket] = pa.ipc.new_stream(self.files[bucket], table.schema)
        self.writers[bucket].write_table(table)

    def close(self) -> None:
        for bucket, writer in self.writers.items():
            writer.close()
            self.files[bucket].close()
        self.writers, self.files = {}, {}

    def batches(self, bucket: object) -> Iterator[pa.RecordBatch]:
        """One closed bucket's rows, batch by batch as they were added."""
        with open(self.path(bucket), "rb") as fh, pa.ipc.open_stream(fh) as reader:
            yield from reader

    def tables(self) -> Iterator[pa.Table]:
        """Close the files and yield each bucket as one table (removing its file)."""
        buckets = sorted(self.writers)
        self.close()
        for b in buckets:
            table = pa.Table.from_batches(list(self.batches(b)))
            self.path(b).unlink()
            yield table
