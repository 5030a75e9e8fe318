"""The aligned phrase memory: how often each upper n-gram (n = 1..3) faced each lower n-gram at the same positions.

Couplets align position by position, so every upper n-gram of a training pair maps to the lower n-gram at
the same positions: the phrase table of the statistical couplet systems (Jiang & Zhou 2008). The labeller
generalises; the memory remembers, and the two are fused in decoding (couplet.decoding.beam).

    memory = PhraseMemory.fit(buckets, vocab_size)     # {length: (up_ids (N, L), down_ids (N, L))}: a build's train split
    memory.save(model_dir / "phrases.parquet"); PhraseMemory.load(path, vocab_size=V)
    memory.unigram_rows(upper_ids)                     # (L, V) log p1(lower char | upper char)
    memory.line(upper_ids).window_log_probs(n, i, history, cand)   # log p_n of the n-grams ending at position i
                                                                   # (couplet.decoding.phrase_lines: the search's view)

Probabilities, with q the lower characters' frequency in the aligned counts (add-one smoothed; PAD/UNK 0):

    p1(l | u)       = (c(u, l) + q(l)) / (c(u) + 1)
    p_n(l.. | u..)  = (c(u.., l..) + β · b) / (c(u..) + β),   b = Π_k p1(l_k | u_k),  β = 1     (n = 2, 3)

so an upper n-gram never seen backs off to the product of unigrams, and a seen one pulls towards the lower
n-grams it faced. Windows holding PAD or UNK on either side are not counted, and score 0 (no preference).

In memory each n is a CSR-like table over sorted integer codes (an n-gram of ids is Σ id_k · V^(n-1-k), so
V may be up to ~2 million): `up_keys` (distinct upper codes), `starts` (their rows' offsets), `low_keys`
(lower codes, ascending within a row) and `counts`. On disk it is one Parquet file, columns n, upper, lower,
count, sorted by (n, upper, lower); `min_counts` prunes entries seen fewer times (per n) when fitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from couplet.core.atomic import atomic_path
from couplet.data.vocab import PAD, UNK
from couplet.decoding.phrase_lines import LinePhrases, Window

__all__ = ["PhraseMemory", "ORDERS", "PROPOSALS"]

ORDERS = (1, 2, 3)
_FORMAT = "1"
_BETA = 1.0
_CACHE_ROWS = 2048  # cached unigram rows: 32 KB each at V = 8 000
_CACHE_WINDOWS = 8192  # cached upper n-grams' split scores: a few hundred entries each, most far fewer
PROPOSALS = 8  # most frequent lower n-grams per upper n-gram whose last character a search tries
_RETRAIN = "retrain (couplet run --force train) or restore the file"
_SCHEMA = pa.schema([("n", pa.int8()), ("upper", pa.int64()), ("lower", pa.int64()), ("count", pa.int32())])


def _codes(ids: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """(N, L) ids -> (N, L - n + 1) int64 codes of every n-gram window."""
    length = ids.shape[1]
    codes = np.zeros((ids.shape[0], length - n + 1), dtype=np.int64)
    for k in range(n):
        codes = codes * vocab_size + ids[:, k : length - n + 1 + k]
    return codes


def _known(ids: np.ndarray, n: int) -> np.ndarray:
    """(N, L - n + 1) bool: windows without PAD/UNK."""
    ok = ids > UNK
    length = ids.shape[1]
    out = np.ones((ids.shape[0], length - n + 1), dtype=bool)
    for k in range(n):
        out &= ok[:, k : length - n + 1 + k]
    return out


@dataclass(frozen=True)
class NgramTable:
    """One order's counts: upper code `up_keys[j]` faced lower codes `low_keys[starts[j]:starts[j+1]]` that often."""

    up_keys: np.ndarray  # (U,) int32 or int64 (whichever holds V^n), ascending
    starts: np.ndarray  # (U + 1,) int32 (int64 past 2^31 entries)
    low_keys: np.ndarray  # (E,) like up_keys, ascending within a row
    counts: np.ndarray  # (E,) int32

    @classmethod
    def from_sorted(cls, upper: np.ndarray, lower: np.ndarray, counts: np.ndarray, code_limit: int) -> "NgramTable":
        """From entries sorted by (upper, lower); codes stay below `code_limit` (V^n), which picks the narrowest dtype."""
        code_dtype = np.int32 if code_limit <= np.iinfo(np.int32).max else np.int64
        first = np.flatnonzero(np.concatenate([[True], upper[1:] != upper[:-1]])) if len(upper) else np.zeros(0, np.int64)
        start_dtype = np.int32 if len(upper) <= np.iinfo(np.int32).max else np.int64
        # the readers hand numpy arrays of their own (no Arrow buffer is kept alive)
        return cls(np.array(upper[first], dtype=code_dtype), np.append(first, len(upper)).astype(start_dtype),
                   np.asarray(lower, dtype=code_dtype), np.asarray(counts, dtype=np.int32))

    @property
    def entries(self) -> int:
        return len(self.low_keys)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.up_keys, self.starts, self.low_keys, self.counts))

    def row(self, upper_code: int) -> tuple[int, int, float]:
        """(start, stop, total) of an upper code's entries; an unseen code gives an empty range and total 0."""
        j = int(np.searchsorted(self.up_keys, self.up_keys.dtype.type(upper_code)))  # same dtype: no copy of the keys
        if j == len(self.up_keys) or self.up_keys[j] != upper_code:
            return 0, 0, 0.0
        start, stop = int(self.starts[j]), int(self.starts[j + 1])
        return start, stop, float(self.counts[start:stop].sum())  # callers cache what they read (no totals kept)

    def lookup(self, start: int, stop: int, lower: np.ndarray) -> np.ndarray:
        """Counts of the lower codes `lower` (any shape) within the row [start, stop); 0 where unseen."""
        if stop == start:
            return np.zeros(lower.shape)
        keys = self.low_keys[start:stop]
        lower = lower.astype(keys.dtype, copy=False)  # codes fit the keys' dtype (< V^n)
        pos = np.minimum(np.searchsorted(keys, lower), stop - start - 1)
        return np.where(keys[pos] == lower, self.counts[start:stop][pos], 0).astype(np.float64)


class PhraseMemory:
    """Aligned n-gram counts of a train split (see the module docstring)."""

    def __init__(self, vocab_size: int, tables: Mapping[int, NgramTable]) -> None:
        if set(tables) != set(ORDERS):
            raise ValueError(f"a phrase memory needs the orders {ORDERS}, got {sorted(tables)}")
        self.vocab_size = int(vocab_size)
        self.tables = dict(tables)
        uni = self.tables[1]
        prior = np.bincount(uni.low_keys, weights=uni.counts, minlength=self.vocab_size)[: self.vocab_size] + 1.0
        prior[[PAD, UNK]] = 0.0
        self.prior = prior / prior.sum()  # q: the lower characters' frequency
        with np.errstate(divide="ignore"):
            self._log_prior = np.log(self.prior).astype(np.float32)
        self._unigram_row = lru_cache(maxsize=_CACHE_ROWS)(self._compute_unigram_row)
        self.window = lru_cache(maxsize=_CACHE_WINDOWS)(self._compute_window)
        self.powers = {n: self.vocab_size ** np.arange(n - 1, -1, -1, dtype=np.int64) for n in ORDERS}  # an n-gram's code

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, buckets: Mapping[int, tuple[np.ndarray, np.ndarray]], vocab_size: int,
            min_counts: Mapping[int, int] | None = None) -> "PhraseMemory":
        """Count the aligned n-grams of `buckets` ({length: (up_ids, down_ids)}); entries seen fewer than
        `min_counts[n]` times are dropped (default: none)."""
        min_counts = dict(min_counts or {})
        tables = {}
        for n in ORDERS:
            uppers, lowers = [], []
            for length, (up, down) in buckets.items():
                if length < n or not len(up):
                    continue
                keep = _known(up, n) & _known(down, n)
                uppers.append(_codes(up, n, vocab_size)[keep])
                lowers.append(_codes(down, n, vocab_size)[keep])
            upper = np.concatenate(uppers) if uppers else np.zeros(0, np.int64)
            lower = np.concatenate(lowers) if lowers else np.zeros(0, np.int64)
            order = np.lexsort((lower, upper))
            upper, lower = upper[order], lower[order]
            new = np.ones(len(upper), dtype=bool)
            new[1:] = (upper[1:] != upper[:-1]) | (lower[1:] != lower[:-1])
            first = np.flatnonzero(new)
            counts = np.diff(np.append(first, len(upper)))
            upper, lower = upper[first], lower[first]
            kept = counts >= min_counts.get(n, 1)
            tables[n] = NgramTable.from_sorted(upper[kept], lower[kept], counts[kept], vocab_size**n)
        return cls(vocab_size, tables)

    @classmethod
    def count_build(cls, build_dir: str | Path, vocab_size: int) -> "PhraseMemory":
        """The memory of a build's train split (all of it, every length; ids of the build's vocabulary)."""
        from couplet.data.batches import load_split  # its shard reader: only counting needs it

        return cls.fit(load_split(build_dir, "train"), vocab_size)

    # ------------------------------------------------------------------ scoring

    def unigram_rows(self, upper_ids: np.ndarray) -> np.ndarray:
        """(len(upper_ids), V) float32 log p1(lower char | upper char); -inf for PAD/UNK."""
        return np.stack([self._unigram_row(int(u)) for u in np.asarray(upper_ids).tolist()]) if len(upper_ids) else \
            np.zeros((0, self.vocab_size), dtype=np.float32)

    def _compute_unigram_row(self, upper_id: int) -> np.ndarray:
        table = self.tables[1]
        start, stop, total = table.row(upper_id) if upper_id > UNK else (0, 0, 0.0)
        if stop == start:
            row = self._log_prior
        else:
            probs = self.prior.copy()
            probs[table.low_keys[start:stop]] += table.counts[start:stop]
            with np.errstate(divide="ignore"):
                row = np.log(probs / (total + _BETA)).astype(np.float32)
        row.flags.writeable = False  # shared by the cache
        return row

    def _compute_window(self, n: int, upper_code: int) -> "Window":
        """The split score of one upper n-gram (`Window`, `LinePhrases`); cached as `window(n, upper_code)`."""
        table = self.tables[n]
        start, stop, total = table.row(upper_code)
        keys, counts = table.low_keys[start:stop].astype(np.int64), table.counts[start:stop]  # int64: offsets are added
        size, backoff, lowers = self.vocab_size, np.zeros(stop - start), keys
        for _ in range(n):  # b = Π p1 of each lower n-gram, digit by digit (last first)
            upper_code, u = divmod(upper_code, size)
            lowers, low = np.divmod(lowers, size)
            backoff += self._unigram_row(u)[low]
        bonus = np.logaddexp(0.0, np.log(counts) - backoff - np.log(_BETA))
        top = np.argsort(-counts, kind="stable")[:PROPOSALS]
        proposals = np.unique(keys[top] % size)
        for array in (keys, bonus, proposals):
            array.flags.writeable = False  # shared by the cache
        return Window(float(np.log(_BETA) - np.log(total + _BETA)), keys, bonus, proposals)

    def line(self, upper_ids: np.ndarray, unigram_rows: np.ndarray | None = None) -> "LinePhrases":
        """The memory's view of one upper line (ids), for scoring lower-line windows during a search."""
        return LinePhrases(self, np.asarray(upper_ids, dtype=np.int64), unigram_rows)

    @property
    def nbytes(self) -> int:
        return sum(table.nbytes for table in self.tables.values()) + self.prior.nbytes

    def describe(self) -> dict:
        return {f"entries_{n}": self.tables[n].entries for n in ORDERS} | {"mbytes": round(self.nbytes / 2**20, 1)}

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        """One Parquet file, written atomically."""
        parts = []
        for n in ORDERS:
            t = self.tables[n]
            upper = np.repeat(t.up_keys.astype(np.int64), np.diff(t.starts))
            parts.append(pa.table({"n": pa.array(np.full(len(upper), n, np.int8)), "upper": upper,
                                   "lower": t.low_keys.astype(np.int64),
                                   "count": t.counts}, schema=_SCHEMA))
        table = pa.concat_tables(parts).replace_schema_metadata(
            {"format": _FORMAT, "vocab_size": str(self.vocab_size)})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> "PhraseMemory":
        """Read a file written by `save`; a missing, damaged or mismatched file is a one-line ValueError."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path} is missing: {_RETRAIN}")
        try:
            memory = cls(*_read_tables(path))
        except Exception as exc:  # pyarrow fails in several ways on a truncated file
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{path} is damaged ({reason}): {_RETRAIN}") from None
        finally:
            pa.default_memory_pool().release_unused()  # the decoded pages: a server keeps only the tables
        if vocab_size is not None and vocab_size != memory.vocab_size:
            raise ValueError(f"{path} was counted for a vocabulary of {memory.vocab_size} characters, "
                             f"the model's has {vocab_size}: retrain (couplet run --force train)")
        return memory


def _read_tables(path: Path) -> tuple[int, dict[int, NgramTable]]:
    """(vocabulary size, tables) of a file written by `PhraseMemory.save`; raises on anything unexpected. Read in
    batches on this thread, each turned into the tables' narrow dtypes at once, so loading never holds the file's
    int64 columns whole (770k pairs: RSS +191 MB for 111 MB of tables, against +217 MB reading the whole table)."""
    reader = pq.ParquetFile(path)
    meta = reader.schema_arrow.metadata or {}
    if meta.get(b"format") != _FORMAT.encode():
        raise ValueError(f"format {meta.get(b'format')!r}, expected {_FORMAT}")
    size = int(meta[b"vocab_size"])
    dtypes = {n: np.int32 if size**n <= np.iinfo(np.int32).max else np.int64 for n in ORDERS}
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {n: [] for n in ORDERS}
    for batch in reader.iter_batches(batch_size=1 << 18, columns=["n", "upper", "lower", "count"], use_threads=False):
        n, upper, lower, count = (batch.column(k).to_numpy() for k in range(4))
        bounds = np.searchsorted(n, [*ORDERS, ORDERS[-1] + 1])  # the file is sorted by (n, upper, lower)
        if np.any(n[1:] < n[:-1]) or bounds[0] or bounds[-1] != len(n):
            raise ValueError(f"orders unsorted or other than {ORDERS}")
        for k, order in enumerate(ORDERS):
            rows = slice(bounds[k], bounds[k + 1])
            if rows.stop > rows.start:
                up, low = upper[rows], lower[rows]
                if up.min() < 0 or up.max() >= size**order or low.min() < 0 or low.max() >= size**order:
                    raise ValueError(f"order {order}: codes out of range")
                parts[order].append((up.astype(dtypes[order]), low.astype(dtypes[order]), count[rows].astype(np.int32)))
        del batch, n, upper, lower, count
    tables = {}
    for order in ORDERS:
        chunks = parts.pop(order)
        upper, lower, count = (np.concatenate([c[j] for c in chunks]) if chunks else np.zeros(0, dtypes[order])
                               for j in range(3))
        del chunks
        if np.any(upper[1:] < upper[:-1]):
            raise ValueError(f"order {order}: codes unsorted")
        tables[order] = NgramTable.from_sorted(upper, lower, count, size**order)
    return size, tables

