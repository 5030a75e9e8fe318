"""Decoding that respects the couplet: from per-position log-probabilities to whole lower lines.

(Over 300 lines on purpose: one search with its constraint handling, top-1 by assignment and top-k
by A*/Murty, reads best in one file; splitting it would scatter the shared tables and invariants.)

The labeller gives, for every character of the upper line (上联), a distribution over the
character at the same position of the lower line (下联). `decode` turns that (L, V) matrix
into the k best whole lines under a switchable set of couplet constraints:

- always: PAD and UNK are never emitted;
- `no_copy`: lower[i] != upper[i] (the seed's prior; punctuation positions excepted when
  `punctuation` is on, since a mark is copied there);
- `punctuation`: a punctuation position gets the same mark, other positions never get one;
- `repetition`: upper[i] == upper[j]  <=>  lower[i] == lower[j]. Positions are grouped by
  their upper character; a group gets one lower character, scored by the sum of its
  positions' log-probabilities, and different groups get different characters;
- `tone`: if the upper line ends in a 仄 (oblique) tone, the lower line's final character
  must be 平 (level). Tones come from pypinyin `Style.TONE3` (1-2 = 平, 3-4 = 仄); a
  character whose tone cannot be determined is not allowed there.

The search is an exact best-first (A*) enumeration over groups with lazily generated
siblings; each group's candidates are pruned to its top N = k + (number of groups)
characters, which provably keeps the k best distinct-character assignments. Should a
pathological input exhaust the search budget, Murty's k-best assignment algorithm (built
on `scipy.optimize.linear_sum_assignment`) finishes the job, still exactly.
"""

from __future__ import annotations

import heapq
import weakref
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from couplet.data.punct import PUNCTUATION, is_punct
from couplet.data.vocab import PAD, UNK, Vocab

__all__ = [
    "PUNCTUATION",
    "PING",
    "ZE",
    "ARGMAX",
    "CONSTRAINED",
    "DecodeOptions",
    "DecodeResult",
    "char_tone",
    "final_position",
    "final_tone",
    "decode",
    "decode_argmax",
    "GroupPlan",
    "plan_groups",
]

PING, ZE = "平", "仄"
NEG_INF = -np.inf


# --------------------------------------------------------------------------- tones


@lru_cache(maxsize=1 << 16)
def char_tone(ch: str) -> str | None:
    """'平' (tones 1-2), '仄' (tones 3-4) or None (neutral tone, unknown, not a Han character).

    Uses the character's default (most common) reading in pypinyin, read in isolation, so that
    the decoder (which chooses characters one group at a time) and the metrics agree.
    """
    if len(ch) != 1 or is_punct(ch) or ch.isspace():
        return None
    from pypinyin import Style, pinyin

    reading = pinyin(ch, style=Style.TONE3, heteronym=False, errors="ignore")
    if not reading or not reading[0] or not reading[0][0]:
        return None
    last = reading[0][0][-1]
    if last in "12":
        return PING
    if last in "34":
        return ZE
    return None


def final_position(line: str) -> int | None:
    """Index of the line's last non-punctuation character (None if there is none)."""
    for i in range(len(line) - 1, -1, -1):
        if not is_punct(line[i]):
            return i
    return None


def final_tone(line: str) -> str | None:
    """Tone class of the line's final (non-punctuation) character."""
    pos = final_position(line)
    return None if pos is None else char_tone(line[pos])


# --------------------------------------------------------------------------- options / results


@dataclass(frozen=True)
class DecodeOptions:
    """Which couplet constraints the decoder enforces (PAD/UNK are always excluded)."""

    no_copy: bool = True
    punctuation: bool = True
    repetition: bool = True
    tone: bool = False

    @classmethod
    def from_flags(cls, constrained: bool = True, tone: bool = False) -> "DecodeOptions":
        """`constrained` switches no-copy, punctuation and repetition together; `tone` is separate."""
        return cls(no_copy=constrained, punctuation=constrained, repetition=constrained, tone=tone)

    def names(self) -> list[str]:
        return [name for name in ("no_copy", "punctuation", "repetition", "tone") if getattr(self, name)]


ARGMAX = DecodeOptions(no_copy=False, punctuation=False, repetition=False, tone=False)
CONSTRAINED = DecodeOptions()


@dataclass
class DecodeResult:
    candidates: list[tuple[str, float]]  # (lower line, total log-probability), best first
    constraints: list[str]  # constraints actually enforced on this line
    relaxed: list[str] = field(default_factory=list)  # requested but dropped: no assignment satisfied them


# --------------------------------------------------------------------------- per-vocabulary tables


class _VocabTables:
    def __init__(self, vocab: Vocab) -> None:
        self.itos = vocab.itos
        self.stoi = vocab.stoi
        self.size = len(vocab)
        self.punct_ids = np.array(
            [i for i, ch in enumerate(vocab.itos) if i not in (PAD, UNK) and is_punct(ch)], dtype=np.intp
        )
        self._ping_penalty: np.ndarray | None = None

    @property
    def ping_penalty(self) -> np.ndarray:
        """0 for 平-tone characters, -inf for the rest (computed on first use, ~0.1 s per 6k chars)."""
        if self._ping_penalty is None:
            ping = np.array([char_tone(ch) == PING for ch in self.itos], dtype=bool)
            ping[[PAD, UNK]] = False
            self._ping_penalty = np.where(ping, 0.0, NEG_INF).astype(np.float32)
        return self._ping_penalty


_TABLES: dict[int, tuple[weakref.ref, _VocabTables]] = {}


def _tables(vocab: Vocab) -> _VocabTables:
    entry = _TABLES.get(id(vocab))
    if entry is not None and entry[0]() is vocab and entry[1].size == len(vocab):
        return entry[1]
    tables = _VocabTables(vocab)
    key = id(vocab)
    _TABLES[key] = (weakref.ref(vocab, lambda _ref, key=key: _TABLES.pop(key, None)), tables)
    return tables


# --------------------------------------------------------------------------- k-best search


class _Candidates:
    """Each group's candidate characters, best first, produced on demand.

    `ids[g]` / `sc[g]` hold what has been extracted so far; `more(g)` pulls the next best
    character of row g (one argmax over the vocabulary, ~1.5 us) until the row is exhausted
    (only -inf left) or `cap` candidates exist. A line without conflicts needs one argmax per
    row; the cap N = k + (number of groups) is what the exactness argument needs.
    """

    def __init__(self, scores: np.ndarray, cap: int) -> None:
        self.scores = scores  # (G, V), owned and consumed (extracted entries become -inf)
        self.cap = cap
        first = scores.argmax(axis=1)
        rows = np.arange(scores.shape[0])
        vals = scores[rows, first]
        scores[rows, first] = NEG_INF
        self.ids: list[list[int]] = [[i] if np.isfinite(v) else [] for i, v in zip(first.tolist(), vals.tolist())]
        self.sc: list[list[float]] = [[v] if np.isfinite(v) else [] for v in vals.tolist()]
        self.done = [not ids for ids in self.ids]

    def more(self, g: int) -> bool:
        if self.done[g] or len(self.ids[g]) >= self.cap:
            return False
        row = self.scores[g]
        a = int(row.argmax())
        v = float(row[a])
        if v == NEG_INF:
            self.done[g] = True
            return False
        row[a] = NEG_INF
        self.ids[g].append(a)
        self.sc[g].append(v)
        return True

    def fill(self) -> None:
        for g in range(len(self.ids)):
            while self.more(g):
                pass


def _kbest_astar(
    cands: _Candidates, k: int, distinct: bool, max_pops: int
) -> tuple[list[tuple[tuple[int, ...], float]], bool]:
    """Best-first enumeration of the k best assignments (one candidate per group).

    A node assigns groups 0..d-1; its priority is its score plus each remaining group's best
    candidate score (an admissible, consistent bound), so complete assignments pop in exact
    order. Children and siblings are generated lazily: popping a node pushes at most its
    first child and its next sibling. Returns (solutions, finished_within_budget).
    """
    cand_ids, cand_sc, more = cands.ids, cands.sc, cands.more
    m = len(cand_ids)
    suffix = [0.0] * (m + 1)
    for d in range(m - 1, -1, -1):
        if not cand_sc[d]:
            return [], True
        suffix[d] = suffix[d + 1] + cand_sc[d][0]
    results: list[tuple[tuple[int, ...], float]] = []
    # (-priority, tiebreak, depth, index of the last group's candidate, score so far, chosen ids)
    heap: list[tuple[float, int, int, int, float, tuple[int, ...]]] = [(-suffix[0], 0, 0, -1, 0.0, ())]
    counter = 1
    pops = 0
    push = heapq.heappush
    while heap and len(results) < k:
        _, _, d, j, score, chosen = heapq.heappop(heap)
        pops += 1
        if pops > max_pops:
            return results, False
        if d > 0:  # next sibling: same prefix, the last group's next (unused) candidate
            g = d - 1
            ids, sc = cand_ids[g], cand_sc[g]
            prefix = chosen[:-1]
            jj = j + 1
            while True:
                if jj >= len(ids) and not more(g):
                    break
                if distinct and ids[jj] in prefix:
                    jj += 1
                    continue
                s = score - sc[j] + sc[jj]
                push(heap, (-(s + suffix[d]), counter, d, jj, s, prefix + (ids[jj],)))
                counter += 1
                break
        if d == m:
            results.append((chosen, score))
            continue
        ids, sc = cand_ids[d], cand_sc[d]  # first child: group d's best (unused) candidate
        jj = 0
        while True:
            if jj >= len(ids) and not more(d):
                break
            if distinct and ids[jj] in chosen:
                jj += 1
                continue
            s = score + sc[jj]
            push(heap, (-(s + suffix[d + 1]), counter, d + 1, jj, s, chosen + (ids[jj],)))
            counter += 1
            break
    return results, True


_BIG = 1e9


def _kbest_murty(cand_ids: list[list[int]], cand_sc: list[list[float]], k: int) -> list[tuple[tuple[int, ...], float]]:
    """Murty's k-best assignments (distinct characters), each subproblem solved by the Hungarian method."""
    from scipy.optimize import linear_sum_assignment

    m = len(cand_ids)
    columns = sorted({c for ids in cand_ids for c in ids})
    col_of = {c: i for i, c in enumerate(columns)}
    base = np.full((m, len(columns)), -_BIG)
    for g, (ids, sc) in enumerate(zip(cand_ids, cand_sc)):
        for c, s in zip(ids, sc):
            base[g, col_of[c]] = s

    def solve(forced: dict[int, int], excluded: frozenset[tuple[int, int]]):
        w = base.copy()
        for r, c in excluded:
            w[r, c] = -_BIG
        for r, c in forced.items():
            keep = w[r, c]
            w[r, :] = -_BIG
            w[:, c] = -_BIG
            w[r, c] = keep
        rows, cols = linear_sum_assignment(w, maximize=True)
        if len(rows) < m or np.any(w[rows, cols] <= -_BIG / 2):
            return None
        assignment = [0] * m
        for r, c in zip(rows, cols):
            assignment[r] = int(c)
        return float(w[rows, cols].sum()), tuple(assignment)

    first = solve({}, frozenset())
    if first is None:
        return []
    heap = [(-first[0], 0, first[1], {}, frozenset())]
    counter = 1
    results = []
    while heap and len(results) < k:
        negs, _, assignment, forced, excluded = heapq.heappop(heap)
        results.append((tuple(columns[c] for c in assignment), -negs))
        forced_now = dict(forced)
        for r in range(m):
            if r in forced:
                continue
            sub_excluded = excluded | {(r, assignment[r])}
            sub = solve(forced_now, sub_excluded)
            if sub is not None:
                heapq.heappush(heap, (-sub[0], counter, sub[1], dict(forced_now), sub_excluded))
                counter += 1
            forced_now[r] = assignment[r]
    return results


# --------------------------------------------------------------------------- decoding


@dataclass
class GroupPlan:
    """A line's repetition groups and their masked score rows: the constraint setup of `decode` and
    `couplet.decoding.beam.beam_decode` (one place, so the two searches enforce the same rules)."""

    group_of: list[int]  # position -> group
    fixed: dict[int, str]  # group -> punctuation mark copied there
    scores: np.ndarray  # (groups, V): summed log-probs of the group's positions, disallowed = -inf
    distinct: bool  # different free groups must get different characters
    applied: list[str]  # constraints enforced on this line ("tone" only where it applied)


def _sum_positions(lp: np.ndarray, group_of: list[int], n_groups: int, dtype) -> np.ndarray:
    """Each group's row: the sum of its positions' rows, position by position in position order, in `dtype`."""
    scores = np.zeros((n_groups, lp.shape[1]), dtype=dtype)
    for i, g in enumerate(group_of):
        scores[g] += lp[i]
    return scores


def plan_groups(
    upper: str, lp: np.ndarray, tables: _VocabTables, options: DecodeOptions, dtype=np.float32
) -> GroupPlan:
    """Groups of `upper` and their score rows with every constraint of `options` applied as masks.

    `repetition` groups positions by upper character (else each position is its own group); a
    group's row sums its positions' log-probabilities. PAD/UNK are -inf everywhere; `punctuation`
    fixes punctuation groups to their mark and masks every punctuation id (fixed rows are left as
    they are: callers skip them); `no_copy` masks the group's own upper character (not in fixed
    groups); `tone` keeps only 平 ids in the final position's group when the upper line ends 仄.

    `dtype` is how groups are summed. float32 (decode's hot path): one matmul of a float32 0/1
    membership matrix with `lp`, whose result follows `lp`'s dtype (float64 log-probs give float64
    sums; where `lp` holds -inf, 0 * -inf would make NaN, so such a line is summed row by row, in `lp`'s
    dtype). Any other dtype (the beam's float64): row by row, in position order, in that dtype. A line
    without repeats is `lp` copied as `dtype` either way. `scores` is a new array the caller owns.
    """
    applied: list[str] = []
    if options.repetition:
        index: dict[str, int] = {}
        group_of = [index.setdefault(ch, len(index)) for ch in upper]
        group_chars = list(index)
    else:
        group_of = list(range(len(upper)))
        group_chars = list(upper)
    n_groups, length = len(group_chars), len(group_of)
    if n_groups == length:  # groups are the positions, in order: nothing to add
        scores = np.array(lp, dtype=dtype, copy=True)
    elif dtype is np.float32 or np.dtype(dtype) == np.float32:  # `is` first: ~1 us on the hot path
        member = np.zeros((n_groups, length), dtype=np.float32)
        member[group_of, np.arange(length)] = 1.0
        with np.errstate(invalid="ignore"):
            scores = member @ lp
        if np.isnan(scores).any():  # 0 * -inf: a masked entry of one position would spoil every other group's row
            scores = _sum_positions(lp, group_of, n_groups, lp.dtype)
    else:
        scores = _sum_positions(lp, group_of, n_groups, dtype)
    scores[:, PAD] = NEG_INF
    scores[:, UNK] = NEG_INF

    fixed: dict[int, str] = {}
    if options.punctuation:
        applied.append("punctuation")
        for g, ch in enumerate(group_chars):
            if is_punct(ch):
                fixed[g] = ch
        if tables.punct_ids.size:
            scores[:, tables.punct_ids] = NEG_INF
    if options.no_copy:
        applied.append("no_copy")
        stoi = tables.stoi
        for g, ch in enumerate(group_chars):
            if g not in fixed:
                uid = stoi.get(ch)
                if uid is not None:
                    scores[g, uid] = NEG_INF
    if options.repetition:
        applied.append("repetition")
    if options.tone and final_tone(upper) == ZE:
        g = group_of[final_position(upper)]
        if g not in fixed:
            scores[g] += tables.ping_penalty
            applied.append("tone")
    n_free = len(group_chars) - len(fixed)
    return GroupPlan(group_of, fixed, scores, options.repetition and n_free > 1, applied)


def _decode_once(
    upper: str, lp: np.ndarray, tables: _VocabTables, top_k: int, options: DecodeOptions, max_pops: int
) -> tuple[list[tuple[str, float]], list[str]]:
    length = len(upper)
    stoi = tables.stoi
    plan = plan_groups(upper, lp, tables, options)
    group_of, fixed, scores, distinct, applied = plan.group_of, plan.fixed, plan.scores, plan.distinct, plan.applied
    n_groups = scores.shape[0]

    free = [g for g in range(n_groups) if g not in fixed]
    m = len(free)
    if fixed:
        scores = scores[free]
    cands = _Candidates(scores, cap=min(top_k + m if distinct else top_k, tables.size))

    solutions: list[tuple[int, ...]]
    if any(cands.done):
        solutions = []
    elif top_k == 1 and (not distinct or len({ids[0] for ids in cands.ids}) == m):
        solutions = [tuple(ids[0] for ids in cands.ids)]
    else:
        found, finished = _kbest_astar(cands, top_k, distinct, max_pops)
        if not finished:
            cands.fill()
            found = _kbest_murty(cands.ids, cands.sc, top_k)
        solutions = [assignment for assignment, _ in found]

    if not solutions:
        return [], applied
    itos = tables.itos
    group_ids = np.zeros(n_groups, dtype=np.intp)
    group_txt: list[str] = [""] * n_groups
    for g, ch in fixed.items():
        group_txt[g] = ch
        group_ids[g] = stoi.get(ch, -1)
    group_of_arr = np.asarray(group_of, dtype=np.intp)
    positions = np.arange(length)
    out: list[tuple[str, float]] = []
    for assignment in solutions:
        for g, cid in zip(free, assignment):
            group_txt[g] = itos[cid]
            group_ids[g] = cid
        lower = "".join([group_txt[g] for g in group_of])
        pos_ids = group_ids[group_of_arr]
        known = pos_ids >= 0  # a punctuation mark missing from the vocabulary is copied at no cost
        total = float(lp[positions[known], pos_ids[known]].astype(np.float64).sum())
        out.append((lower, total))
    out.sort(key=lambda item: -item[1])
    return out, applied


_RELAX_ORDER = ("tone", "repetition", "punctuation", "no_copy")


def decode(
    upper: str,
    log_probs: np.ndarray,
    vocab: Vocab,
    *,
    top_k: int = 1,
    options: DecodeOptions = CONSTRAINED,
    max_pops: int = 20000,
) -> DecodeResult:
    """The `top_k` best lower lines for `upper` under `options`, ranked by total log-probability.

    `log_probs` is the labeller's (L, V) log-softmax output for this line (rows beyond len(upper),
    e.g. padding, are ignored). If no line satisfies every requested constraint (tiny vocabularies),
    constraints are dropped in the order tone, repetition, punctuation, no-copy and listed in
    `DecodeResult.relaxed`.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    lp = checked_log_probs(upper, log_probs, vocab)
    if not upper:
        return DecodeResult(candidates=[("", 0.0)], constraints=[])
    tables = _tables(vocab)
    return search_relaxing(options, lambda current: _decode_once(upper, lp, tables, top_k, current, max_pops))


def checked_log_probs(upper: str, log_probs: np.ndarray, vocab: Vocab) -> np.ndarray:
    """`log_probs` as an array of the line's rows; a ValueError unless its shape is (>= len(upper), len(vocab))."""
    lp = np.asarray(log_probs)
    if lp.ndim != 2 or lp.shape[0] < len(upper) or lp.shape[1] != len(vocab):
        raise ValueError(
            f"log_probs must have shape (>= {len(upper)}, {len(vocab)}) for this line and vocabulary, got {lp.shape}"
        )
    return lp[: len(upper)]


def search_relaxing(options: DecodeOptions, attempt) -> DecodeResult:
    """`attempt(options) -> (candidates, constraints applied)`, retried with constraints dropped in `_RELAX_ORDER`
    while it finds nothing; the dropped ones are listed in `DecodeResult.relaxed`."""
    relaxed: list[str] = []
    current = options
    while True:
        candidates, applied = attempt(current)
        if candidates:
            return DecodeResult(candidates=candidates, constraints=applied, relaxed=relaxed)
        still_on = [name for name in _RELAX_ORDER if getattr(current, name)]
        if not still_on:
            return DecodeResult(candidates=[], constraints=applied, relaxed=relaxed)
        relaxed.append(still_on[0])
        current = replace(current, **{still_on[0]: False})


def decode_argmax(upper: str, log_probs: np.ndarray, vocab: Vocab, *, top_k: int = 1) -> DecodeResult:
    """The seed's decoding: the best character at each position independently (never PAD/UNK)."""
    return decode(upper, log_probs, vocab, top_k=top_k, options=ARGMAX)
