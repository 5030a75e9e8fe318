"""Beam search over positions with a lower-line LM fused in (shallow fusion), under the couplet constraints.

`couplet.decoding.decode.decode` is exact because a line's score splits into independent per-group terms. A
character bigram LM (`couplet.decoding.lm.CharBigramLM`) couples neighbouring positions, so `beam_decode` searches
left to right instead, ranking hypotheses by

    score = model log-prob + lm_weight · LM log-prob.

A hypothesis holds the characters chosen so far and, per repetition group (positions sharing an upper
character), the group's lower character. Every rule of `decode` (see docs/decoding.md) holds as
positions are filled: PAD/UNK never; `punctuation` copies the mark (also one missing from the
vocabulary) and keeps marks elsewhere out; `no_copy`; `no_reuse` (no ideograph of the upper line anywhere); `repetition` (a group's later positions are forced
to its character; a new group's character differs from every other group's); `tone` (the final
position's group allows only 平 characters when the upper line ends 仄). The groups and their masked score
rows come from `couplet.decoding.constraints.plan_groups`, the setup `decode` uses (summed in float64 here). A group's
model log-prob for ALL its positions is added when its character is chosen, so the model part is exact
from then on; the LM part accrues position by position.

Each step keeps the `beam_size` best expansions over every hypothesis × character (one vectorised
(beam, V) pass), so the per-row candidates are implicitly that hypothesis's best beam_size + (number of
groups) characters minus those other groups use. The exact model-only k-best of `decode` join the
beam's finalists before the final ranking: fusion then never returns something the fused score ranks
below decode's answers, and a beam that pruned itself into a dead end (tiny vocabularies) does not
force a relaxation. Without an LM (or with lm_weight 0) `beam_decode` is `decode`.
"""

from __future__ import annotations

import numpy as np

from couplet.decoding.constraints import (
    CONSTRAINED,
    DecodeOptions,
    DecodeResult,
    GroupPlan,
    checked_log_probs,
    plan_groups,
    search_relaxing,
    vocab_tables,
)
from couplet.decoding.decode import decode, exact_kbest
from couplet.decoding.lm import CharBigramLM
from couplet.data.vocab import UNK, Vocab

__all__ = ["beam_decode", "fused_score"]

NEG_INF = -np.inf


def _top(row: np.ndarray, n: int) -> np.ndarray:
    """Ids of the row's n best finite entries, best first."""
    n = min(n, row.size)
    idx = np.argpartition(-row, n - 1)[:n] if n < row.size else np.arange(row.size)
    idx = idx[np.isfinite(row[idx])]
    return idx[np.argsort(-row[idx], kind="stable")]


def _beam_search(
    lp: np.ndarray, plan: GroupPlan, stoi: dict[str, int], lm: CharBigramLM | None, lm_weight: float, beam_size: int
) -> list[np.ndarray]:
    """The surviving hypotheses' id rows (an out-of-vocabulary copied mark is UNK), best first."""
    length, n_groups = len(plan.group_of), plan.scores.shape[0]
    weight = lm_weight if lm is not None else 0.0
    n_candidates = beam_size + n_groups  # other groups use at most n_groups - 1 of them
    ids = np.zeros((1, length), dtype=np.int64)
    group_char = np.full((1, n_groups), -1, dtype=np.int64)
    model = np.zeros(1)
    lm_score = np.zeros(1)
    for i, g in enumerate(plan.group_of):
        n = ids.shape[0]
        prev = ids[:, i - 1] if i else np.full(n, lm.bos if lm is not None else 0)
        if g in plan.fixed or group_char[0, g] >= 0:  # a copied mark, or a repeated group's (scored) character
            if g in plan.fixed:
                chosen = np.full(n, stoi.get(plan.fixed[g], UNK), dtype=np.int64)
                model = model + (lp[i, chosen[0]] if chosen[0] != UNK else 0.0)
            else:
                chosen = group_char[:, g].copy()
            if weight and chosen[0] != UNK:
                lm_score = lm_score + lm.pair_log_probs(prev, chosen)
        else:  # a new group: the beam_size best (hypothesis, candidate) expansions
            cand = _top(plan.scores[g], n_candidates)
            if cand.size == 0:
                return []
            total = (model + weight * lm_score)[:, None] + plan.scores[g][cand][None, :]
            if weight:
                lm_next = lm.pair_log_probs(np.repeat(prev, cand.size), np.tile(cand, n)).reshape(n, cand.size)
                total += weight * lm_next
            if plan.distinct:
                total[(cand[None, :, None] == group_char[:, None, :]).any(axis=2)] = NEG_INF
            flat = total.ravel()
            keep = min(beam_size, int(np.isfinite(flat).sum()))
            if keep == 0:
                return []
            best = _top(flat, keep)
            parent, j = np.divmod(best, cand.size)
            chosen = cand[j]
            ids, group_char = ids[parent], group_char[parent]
            group_char[:, g] = chosen
            model = model[parent] + plan.scores[g][chosen]
            lm_score = lm_score[parent] + (lm_next[parent, j] if weight else 0.0)
        ids[:, i] = chosen
    order = np.argsort(-(model + weight * lm_score), kind="stable")
    return [ids[b] for b in order]


def _text(plan: GroupPlan, vocab: Vocab, row: np.ndarray) -> str:
    """A hypothesis' line: the copied mark at fixed positions (in the vocabulary or not), else the ids' characters."""
    return "".join(plan.fixed.get(g, "") or vocab.itos[int(c)] for g, c in zip(plan.group_of, row))


def fused_score(line: str, lp: np.ndarray, vocab: Vocab, lm: CharBigramLM | None, lm_weight: float) -> float:
    """model log-prob + lm_weight · LM log-prob of `line`, in float64 (a mark outside the vocabulary adds 0)."""
    ids = [vocab.stoi.get(ch, UNK) for ch in line]
    model = sum(float(lp[i, c]) for i, c in enumerate(ids) if c != UNK)
    if lm is None or lm_weight == 0:
        return model
    return model + lm_weight * lm.ids_log_prob(ids)


def beam_decode(
    upper: str,
    log_probs: np.ndarray,
    vocab: Vocab,
    *,
    top_k: int = 1,
    options: DecodeOptions = CONSTRAINED,
    lm: CharBigramLM | None = None,
    lm_weight: float = 0.0,
    beam_size: int = 8,
) -> DecodeResult:
    """The `top_k` best lower lines for `upper` by model log-prob + `lm_weight` · LM log-prob (the candidates'
    scores), under `options`; relaxes constraints like `decode` when nothing satisfies them all.

    The beam is at least `top_k` wide. With `lm=None` or `lm_weight=0` this is `decode` (exact).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if lm_weight < 0:
        raise ValueError(f"lm_weight must be >= 0, got {lm_weight}")
    if lm is None or lm_weight == 0:
        return decode(upper, log_probs, vocab, top_k=top_k, options=options)
    if lm.vocab_size != len(vocab):
        raise ValueError(f"the LM has a vocabulary of {lm.vocab_size} characters, the model's has {len(vocab)}")
    lp = checked_log_probs(upper, log_probs, vocab)
    if not upper:
        return DecodeResult(candidates=[("", 0.0)], constraints=[])
    tables = vocab_tables(vocab)

    def attempt(current: DecodeOptions) -> tuple[list[tuple[str, float]], list[str]]:
        plan = plan_groups(upper, lp, tables, current, dtype=np.float64)  # the beam sums groups in float64
        found = _beam_search(lp, plan, tables.stoi, lm, lm_weight, max(beam_size, top_k))
        finalists = [_text(plan, vocab, row) for row in found]
        exact, _ = exact_kbest(upper, lp, tables, top_k, current)
        pool = list(dict.fromkeys([*finalists, *(line for line, _ in exact)]))
        scored = sorted(((line, fused_score(line, lp, vocab, lm, lm_weight)) for line in pool), key=lambda item: -item[1])
        return scored[:top_k], plan.applied

    return search_relaxing(options, attempt)

