"""One upper line's view of the aligned phrase memory (couplet.decoding.phrases), shaped for a search.

An order-n window's log p_n = log(c + β·b) − log(C + β), with b = Π_k p1(l_k | u_k), splits into a part separable
by position, which the search adds to the model's rows once (`LinePhrases.with_separable`), and a bonus that is
0 unless the upper n-gram faced this very lower n-gram (`BonusIndex`): only lower n-grams the memory holds cost
the search anything, and a line's score is what the formula says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np

from couplet.data.vocab import UNK

__all__ = ["LinePhrases", "BonusIndex", "Window"]

COUPLED_ORDERS = (2, 3)  # the orders whose windows span several positions


class Memory(Protocol):
    """What a line's view reads of the memory (couplet.decoding.phrases.PhraseMemory)."""

    vocab_size: int
    powers: dict[int, np.ndarray]  # n -> V^(n-1) .. V^0: an n-gram's code is its ids' dot product with them

    def window(self, n: int, upper_code: int) -> "Window": ...

    def unigram_rows(self, upper_ids: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Window:
    """What one upper n-gram contributes to a lower line's score, split for the search (see `LinePhrases`)."""

    constant: float  # log β − log(c(u..) + β): 0 for an upper n-gram never seen
    keys: np.ndarray  # (E,) the lower codes it faced, ascending
    bonus: np.ndarray  # (E,) float64 log(1 + c(u.., l..) / (β · b(l..)))
    proposals: np.ndarray  # the last characters of its PROPOSALS most frequent lower n-grams


class LinePhrases:
    """One upper line's view of the memory, for a search that fills the lower line position by position.

    An order-n window's log p_n = log(c + β·b) − log(C + β) splits, with b = Π_k p1(l_k | u_k), into

        Σ_k log p1(l_k | u_k) + log β − log(C + β)     separable by position: `with_separable` adds it to the rows
        + log(1 + c(u.., l..) / (β · b))                 0 unless the upper n-gram faced this lower one: `BonusIndex`

    so only lower n-grams the memory holds cost the search anything, and a line's score is unchanged."""

    def __init__(self, memory: Memory, upper_ids: np.ndarray, unigram_rows: np.ndarray | None) -> None:
        self.memory = memory
        self.upper_ids = upper_ids
        self.uni = unigram_rows if unigram_rows is not None else memory.unigram_rows(upper_ids)  # (L, V) float32
        ids = upper_ids.tolist()
        self.windows: dict[tuple[int, int], Window] = {}  # (n, i): the upper n-gram ending at i, when it has no PAD/UNK
        for n in COUPLED_ORDERS:
            for i in range(n - 1, len(ids)):
                window = ids[i - n + 1 : i + 1]
                if min(window) > UNK:
                    code = 0
                    for u in window:
                        code = code * memory.vocab_size + u
                    self.windows[(n, i)] = memory.window(n, code)

    def with_separable(self, lp: np.ndarray, weights: Mapping[int, float]) -> np.ndarray:
        """(L, V): `lp` plus Σ_n weights[n] · (each order-n window's separable part), by position (order 1:
        log p1 at every position); a window's constant goes to its last position."""
        length = len(self.upper_ids)
        factor, constant = np.full(length, float(weights.get(1, 0.0))), np.zeros(length)
        for (n, i), window in self.windows.items():
            weight = weights.get(n, 0.0)
            if weight > 0:
                factor[i - n + 1 : i + 1] += weight
                constant[i] += weight * window.constant
        # in float32, like the rows; where no window covers a position (factor 0), nothing is added there (0 times a
        # PAD/UNK -inf would be NaN)
        scaled = np.multiply(factor.astype(np.float32)[:, None], self.uni, out=np.zeros_like(self.uni),
                             where=factor[:, None] > 0)
        scaled += constant.astype(np.float32)[:, None]
        return scaled + lp

    def bonus_index(self, weights: Mapping[int, float]) -> "BonusIndex":
        """The non-separable parts of the orders in `weights` (n >= 2), weighted, as one table (`BonusIndex`)."""
        return BonusIndex(self, weights)

    def window_log_probs(self, n: int, i: int, history: np.ndarray, cand: np.ndarray, *, paired: bool = False) -> np.ndarray:
        """log p_n of the lower n-grams ending at position i, whole (the two parts together; `BonusIndex.score`'s
        arguments). 0 where the upper or lower window holds PAD/UNK."""
        window = self.windows.get((n, i))
        shape = (history.shape[0],) if paired else (history.shape[0], cand.shape[0])
        if window is None:
            return np.zeros(shape)
        before = history[:, i - n + 1 : i]
        backoff = self.uni[np.arange(i - n + 1, i), before].astype(np.float64).sum(axis=1)
        known = (before > UNK).all(axis=1)
        if paired:
            backoff, known = backoff + self.uni[i, cand], known & (cand > UNK)
        else:
            backoff = backoff[:, None] + self.uni[i, cand][None, :]
            known = known[:, None] & (cand > UNK)[None, :]
        scores = backoff + window.constant + self.bonus_index({n: 1.0}).score(i, history, cand, paired=paired)
        return np.where(known, scores, 0.0)

    def proposals(self, n: int, i: int) -> np.ndarray:
        """The last characters of the most frequent lower n-grams facing the upper n-gram ending at i."""
        window = self.windows.get((n, i))
        return window.proposals if window is not None else np.zeros(0, dtype=np.int64)


class BonusIndex:
    """One line's weighted bonuses (`LinePhrases.bonus`) of every window that faced some lower n-gram, in one sorted
    table: window s owns the key range [offset_s, offset_s + V^n), so any set of (window, lower n-gram) pairs is
    looked up with one searchsorted. A lower n-gram's code is a dot product of the lower ids with the window's
    column of `coefficients` (V^k at its positions, 0 elsewhere)."""

    def __init__(self, line: LinePhrases, weights: Mapping[int, float]) -> None:
        size, length = line.memory.vocab_size, len(line.upper_ids)
        keys, values, slots = [], [], []
        offset = 0
        for (i, n) in sorted((i, n) for n, i in line.windows):  # by last position: each position's windows adjacent
            window = line.windows[(n, i)]
            weight = weights.get(n, 0.0)
            if weight <= 0 or not len(window.keys):
                continue
            keys.append(window.keys + offset)
            values.append(weight * window.bonus)
            slots.append((i, n, offset))
            offset += size**n
        if offset >= 2**62:  # L · V^3 keys: a vocabulary past ~400k characters
            raise ValueError(f"a line of {length} characters over a vocabulary of {size} is beyond the phrase index's keys")
        self.keys = np.concatenate([*keys, [np.iinfo(np.int64).max]])  # a sentinel: searchsorted never runs off the end
        self.values = np.concatenate([*values, [0.0]])
        self.coefficients = np.zeros((length, len(slots)), dtype=np.int64)  # (L, S): V^k at a window's positions
        for s, (i, n, _) in enumerate(slots):
            self.coefficients[i - n + 1 : i + 1, s] = line.memory.powers[n]
        self.offsets = np.array([offset for _, _, offset in slots], dtype=np.int64)
        # per position: the windows ending there (adjacent slots), as (coefficients of the earlier positions, offsets)
        ranges: dict[int, list[int]] = {}
        for s, (i, _, _) in enumerate(slots):
            ranges.setdefault(i, [s, s])[1] = s + 1
        self.ending = {i: (self.coefficients[:i, a:b], self.offsets[a:b]) for i, (a, b) in ranges.items()}

    def _lookup(self, codes: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.keys, codes)
        return np.where(self.keys[pos] == codes, self.values[pos], 0.0)  # PAD/UNK never match: no entry holds them

    def score(self, i: int, history: np.ndarray, cand: np.ndarray, *, paired: bool = False) -> np.ndarray | float:
        """The bonuses of the windows ending at position i: `history` (H, >= i) the hypotheses' ids before i, `cand`
        (C,) the ids tried at i after each -> (H, C), or with `paired` one id per hypothesis -> (H,); 0.0 when no
        window there faced anything."""
        found = self.ending.get(i)
        if found is None:
            return 0.0
        coefficients, offsets = found
        base = history[:, :i] @ coefficients + offsets  # (H, S)
        codes = base + cand[:, None] if paired else base[:, :, None] + cand[None, None, :]
        return self._lookup(codes).sum(axis=1)

    def score_lines(self, ids: np.ndarray) -> np.ndarray:
        """(N,) every window's bonus for whole lines `ids` (N, L)."""
        return self._lookup(ids @ self.coefficients + self.offsets).sum(axis=1)
