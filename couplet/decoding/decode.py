"""The exact k-best search: from per-position log-probabilities to whole lower lines under the couplet rules.

The labeller gives, for every character of the upper line (上联), a distribution over the
character at the same position of the lower line (下联). `decode` turns that (L, V) matrix into
the k best whole lines under the constraints of `couplet.decoding.constraints` (`DecodeOptions`),
whose `plan_groups` gives each repetition group one row of masked, summed log-probabilities. A
line's score then splits into independent per-group terms, with different groups taking different
characters: a k-best assignment problem.

The search is an exact best-first (A*) enumeration over groups with lazily generated
siblings; each group's candidates are pruned to its top N = k + (number of groups)
characters, which provably keeps the k best distinct-character assignments. Should a
pathological input exhaust the search budget, Murty's k-best assignment algorithm (built
on `scipy.optimize.linear_sum_assignment`) finishes the job, still exactly.
"""

from __future__ import annotations

import heapq

import numpy as np

from couplet.data.vocab import Vocab
from couplet.decoding.constraints import (
    ARGMAX,
    CONSTRAINED,
    DecodeOptions,
    DecodeResult,
    GroupPlan,
    VocabTables,
    checked_log_probs,
    plan_groups,
    search_relaxing,
    vocab_tables,
)

__all__ = ["decode", "decode_argmax", "exact_kbest"]

NEG_INF = -np.inf


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


def exact_kbest(
    upper: str, lp: np.ndarray, tables: VocabTables, top_k: int, options: DecodeOptions, max_pops: int = 20000,
    plan: GroupPlan | None = None,
) -> tuple[list[tuple[str, float]], list[str]]:
    """One attempt of `decode` (no relaxing): the `top_k` best lines of `upper` under `options`, best first, and the
    constraints applied; no lines when nothing satisfies them. `lp` holds exactly the line's rows. `plan`: that
    line's `plan_groups` under `options`, when the caller has one it no longer needs (its scores are consumed)."""
    length = len(upper)
    stoi = tables.stoi
    plan = plan if plan is not None else plan_groups(upper, lp, tables, options)
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
        if not finished and not distinct:  # Murty's assignments are distinct: without that rule, finish the A* (cheap)
            found, finished = _kbest_astar(cands, top_k, distinct, max_pops=1 << 62)
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
    constraints are dropped in the order tone, repetition, punctuation, no-copy, no-reuse and listed in
    `DecodeResult.relaxed`.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    lp = checked_log_probs(upper, log_probs, vocab)
    if not upper:
        return DecodeResult(candidates=[("", 0.0)], constraints=[])
    tables = vocab_tables(vocab)
    return search_relaxing(options, lambda current: exact_kbest(upper, lp, tables, top_k, current, max_pops))


def decode_argmax(upper: str, log_probs: np.ndarray, vocab: Vocab, *, top_k: int = 1) -> DecodeResult:
    """The seed's decoding: the best character at each position independently (never PAD/UNK)."""
    return decode(upper, log_probs, vocab, top_k=top_k, options=ARGMAX)
