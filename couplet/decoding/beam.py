"""Beam search over positions with a lower-line LM and the aligned phrase memory fused in, under the couplet rules.

`couplet.decoding.decode.decode` is exact because a line's score splits into independent per-group terms. A
character bigram LM (`couplet.decoding.lm.CharBigramLM`) and the phrase memory's bigrams and trigrams
(`couplet.decoding.phrases`) couple neighbouring positions, so `beam_decode` searches left to right instead,
ranking hypotheses by

    score = model log-prob + phrase_uni · Σ log p1 + lm_weight · LM log-prob + phrase_bi · Σ log p2 + phrase_tri · Σ log p3.

The unigram term is per position, so it is added to the model's rows before the search (with only that term,
the search stays `decode`'s exact one); so is the part of each bigram and trigram term that splits by position
(its back-off to unigrams, `LinePhrases`). Each coupling term (`Coupling`: the LM, the rest of the phrase
windows, which only lower n-grams the memory holds have) scores the characters tried at a position given each
hypothesis' earlier characters; the phrase memory also proposes the characters its n-grams faced, so a phrase
the labeller ranks low can still enter the beam.

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

from typing import Protocol, Sequence

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
from couplet.decoding.phrases import LinePhrases, PhraseMemory
from couplet.data.vocab import UNK, Vocab

__all__ = ["beam_decode", "line_scores", "Coupling", "LMCoupling", "PhraseCoupling", "fused_rows"]

NEG_INF = -np.inf
_SAMPLE_STRIDE = 8  # candidates: a row's threshold comes from every 8th entry


class Coupling(Protocol):
    """A score term that depends on neighbouring lower-line characters (weighted already)."""

    def score(self, i: int, history: np.ndarray, cand: np.ndarray, paired: bool = False) -> np.ndarray | float:
        """(H, C) float64: the term for trying `cand` (C,) at position i after each hypothesis' `history` (H, >= i);
        with `paired`, `cand` holds one id per hypothesis and the result is (H,); a scalar when it is the same for all."""
        ...

    def score_lines(self, ids: np.ndarray) -> np.ndarray:
        """(N,) float64: the term summed over every position of whole lines `ids` (N, L)."""
        ...

    def proposals(self, i: int) -> np.ndarray:
        """Ids worth trying at position i whatever the model's rows say (may be empty)."""
        ...

    @property
    def empty(self) -> bool:
        """The term is 0 for every line of this upper line (the search may skip it)."""
        ...


class LMCoupling:
    """lm_weight · log p(char | previous char) of the lower-line bigram LM; a copied mark outside the vocabulary
    (UNK) adds 0."""

    def __init__(self, lm: CharBigramLM, weight: float) -> None:
        self.lm, self.weight = lm, weight

    def score(self, i: int, history: np.ndarray, cand: np.ndarray, paired: bool = False) -> np.ndarray:
        n = history.shape[0]
        prev = history[:, i - 1] if i else np.full(n, self.lm.bos)
        if paired:
            return np.where(cand != UNK, self.weight * self.lm.pair_log_probs(prev, cand), 0.0)
        lp = self.lm.pair_log_probs(np.repeat(prev, cand.size), np.tile(cand, n)).reshape(n, cand.size)
        return np.where(cand[None, :] != UNK, self.weight * lp, 0.0)

    def score_lines(self, ids: np.ndarray) -> np.ndarray:
        prev = np.concatenate([np.full((ids.shape[0], 1), self.lm.bos, dtype=ids.dtype), ids[:, :-1]], axis=1)
        lp = self.lm.pair_log_probs(prev.ravel(), ids.ravel()).reshape(ids.shape)
        return np.where(ids != UNK, self.weight * lp, 0.0).sum(axis=1)

    def proposals(self, i: int) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    @property
    def empty(self) -> bool:
        return False


class PhraseCoupling:
    """phrase_bi · log p2 + phrase_tri · log p3 of the lower n-grams ending at each position, less the part separable
    by position (`LinePhrases.with_separable`, which `_fusion` adds to the rows): only n-grams the memory holds score."""

    def __init__(self, line: LinePhrases, weights: dict[int, float]) -> None:
        self.line = line
        self.weights = {n: w for n, w in weights.items() if w > 0}
        self.index = line.bonus_index(self.weights)

    def score(self, i: int, history: np.ndarray, cand: np.ndarray, paired: bool = False) -> np.ndarray | float:
        return self.index.score(i, history, cand, paired=paired)

    def score_lines(self, ids: np.ndarray) -> np.ndarray:
        return self.index.score_lines(ids)

    @property
    def empty(self) -> bool:
        """No window of the line faced any lower n-gram: the term is 0 for every line."""
        return not self.index.ending

    def proposals(self, i: int) -> np.ndarray:
        found = [self.line.proposals(n, i) for n in self.weights]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _coupled(couplings: Sequence[Coupling], i: int, history: np.ndarray, cand: np.ndarray, paired: bool = False) -> np.ndarray | float:
    total: np.ndarray | float = 0.0  # broadcasts against (H, C) or (H,)
    for coupling in couplings:
        total = total + coupling.score(i, history, cand, paired)
    return total


def _candidates(plan: GroupPlan, couplings: Sequence[Coupling], n_best: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each free group's candidate ids (ascending) and their row scores: its `n_best` by its row, plus what the
    couplings propose at its first position; finite scores only. Every group at once, in a few array operations."""
    first: dict[int, int] = {}
    for i, g in enumerate(plan.group_of):
        first.setdefault(g, i)
    free = [g for g in first if g not in plan.fixed]
    if not free:
        return {}
    rows = plan.scores[free] if len(free) < plan.scores.shape[0] else plan.scores  # no copy when nothing is fixed
    n_rows, size = rows.shape
    if n_best * _SAMPLE_STRIDE < size:
        # each row's n_best-th largest among every _SAMPLE_STRIDE-th entry: at least n_best entries reach it, so the
        # row's n_best largest are among those that do (~n_best * stride of them), found without sorting it all
        threshold = np.partition(rows[:, ::_SAMPLE_STRIDE], -n_best, axis=1)[:, -n_best, None]
        row_of, ids = np.divmod(np.flatnonzero(rows >= threshold), size)  # (a 2-D nonzero is ~10x slower)
    else:
        row_of, ids = np.divmod(np.arange(rows.size), size)
    order = np.argsort(-rows[row_of, ids], kind="stable")
    order = order[np.argsort(row_of[order], kind="stable")]  # by row, best first
    row_of, ids = row_of[order], ids[order]
    best = np.arange(len(row_of)) - np.searchsorted(row_of, row_of) < n_best  # rank within the row
    proposed = [np.concatenate([c.proposals(first[g]) for c in couplings]) if couplings else np.zeros(0, np.int64)
                for g in free]
    row_of = np.concatenate([row_of[best], np.repeat(np.arange(n_rows), [len(p) for p in proposed])])
    ids = np.concatenate([ids[best], *proposed])
    codes = np.sort(row_of * size + ids)
    row_of, ids = np.divmod(codes[np.concatenate([[True], codes[1:] != codes[:-1]])], size)  # each (row, id) once
    scores = rows[row_of, ids]
    finite = np.isfinite(scores)
    row_of, ids, scores = row_of[finite], ids[finite], scores[finite]
    bounds = np.searchsorted(row_of, np.arange(n_rows + 1))
    return {g: (ids[bounds[k] : bounds[k + 1]], scores[bounds[k] : bounds[k + 1]]) for k, g in enumerate(free)}


def _exact_best(plan: GroupPlan, candidates: dict[int, tuple[np.ndarray, np.ndarray]], stoi: dict[str, int]) -> np.ndarray | None:
    """The best line by the rows alone (decode's top answer) as ids when each group's best candidate is a different
    character (or the rule does not ask for that), else None (decode's own search is needed)."""
    best = {g: int(cand[np.argmax(scores)]) for g, (cand, scores) in candidates.items() if len(cand)}
    if len(best) < len(candidates) or (plan.distinct and len(set(best.values())) < len(best)):
        return None
    return np.array([stoi.get(plan.fixed[g], UNK) if g in plan.fixed else best[g] for g in plan.group_of], dtype=np.int64)


def _beam_search(
    lp: np.ndarray, plan: GroupPlan, stoi: dict[str, int], couplings: Sequence[Coupling], beam_size: int,
    candidates: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The surviving hypotheses' id rows (H, L) (an out-of-vocabulary copied mark is UNK) and their fused scores (H,),
    best first (none: two empty arrays). `candidates`: `_candidates(plan, couplings, beam_size + groups)`, when the
    caller has them."""
    length, n_groups = len(plan.group_of), plan.scores.shape[0]
    none = np.zeros((0, length), dtype=np.int64), np.zeros(0)
    if candidates is None:
        candidates = _candidates(plan, couplings, beam_size + n_groups)  # other groups use at most n_groups - 1
    ids = np.zeros((1, length), dtype=np.int64)
    group_char = np.full((1, n_groups), -1, dtype=np.int64)
    total = np.zeros(1)
    for i, g in enumerate(plan.group_of):
        if g in plan.fixed:  # a copied mark: the same character for every hypothesis
            chosen = np.full(ids.shape[0], stoi.get(plan.fixed[g], UNK), dtype=np.int64)
            total = total + (lp[i, chosen[0]] if chosen[0] != UNK else 0.0)
            if couplings:
                total = total + _coupled(couplings, i, ids, chosen, paired=True)
        elif group_char[0, g] >= 0:  # a repeated group: its (already scored) character, one per hypothesis
            chosen = group_char[:, g].copy()
            if couplings:
                total = total + _coupled(couplings, i, ids, chosen, paired=True)
        else:  # a new group: the beam_size best (hypothesis, candidate) expansions
            cand, row = candidates[g]
            if cand.size == 0:
                return none
            expanded = total[:, None] + row[None, :]
            if couplings:
                expanded += _coupled(couplings, i, ids, cand)
            if plan.distinct and g:  # groups are numbered in order of appearance: those before g are chosen
                expanded[(cand[None, :, None] == group_char[:, None, :g]).any(axis=2)] = NEG_INF
            flat = expanded.ravel()
            best = np.argsort(-flat, kind="stable")[:beam_size]
            best = best[np.isfinite(flat[best])]  # -inf sorts last
            if best.size == 0:
                return none
            parent, j = np.divmod(best, cand.size)
            chosen = cand[j]
            ids, group_char = ids[parent], group_char[parent]
            group_char[:, g] = chosen
            total = flat[best]
        ids[:, i] = chosen
    order = np.argsort(-total, kind="stable")
    return ids[order], total[order]


def _text(plan: GroupPlan, vocab: Vocab, row: np.ndarray) -> str:
    """A hypothesis' line: the copied mark at fixed positions (in the vocabulary or not), else the ids' characters."""
    return "".join(plan.fixed.get(g, "") or vocab.itos[int(c)] for g, c in zip(plan.group_of, row))


def _line_scores(lines: Sequence[str], lp: np.ndarray, vocab: Vocab, couplings: Sequence[Coupling]) -> np.ndarray:
    """The fused scores of equally long lines, in float64 (a mark outside the vocabulary adds 0 model score)."""
    ids = np.array([[vocab.stoi.get(ch, UNK) for ch in line] for line in lines], dtype=np.int64).reshape(len(lines), -1)
    known = ids != UNK
    model = np.where(known, lp[np.arange(ids.shape[1])[None, :], ids].astype(np.float64), 0.0).sum(axis=1)
    for coupling in couplings:
        model += coupling.score_lines(ids)
    return model


def fused_rows(upper: str, lp: np.ndarray, vocab: Vocab, phrases: PhraseMemory | None,
               phrase_weights: tuple[float, float, float]) -> np.ndarray:
    """The rows the fused search ranks characters by: `lp` plus every phrase term separable by position (the
    unigrams, and the bigrams' and trigrams' back-off parts; `lp` itself when nothing is fused)."""
    return _fusion(upper, lp, vocab, None, 0.0, phrases, phrase_weights)[0]


def _fusion(upper: str, lp: np.ndarray, vocab: Vocab, lm: CharBigramLM | None, lm_weight: float,
            phrases: PhraseMemory | None, phrase_weights: tuple[float, float, float]) -> tuple[np.ndarray, list[Coupling]]:
    """The rows with the phrase terms separable by position added, and the coupling terms, of one line."""
    uni, bi, tri = phrase_weights if phrases is not None else (0.0, 0.0, 0.0)
    couplings: list[Coupling] = []
    if lm is not None and lm_weight > 0:
        couplings.append(LMCoupling(lm, lm_weight))
    if uni > 0 or bi > 0 or tri > 0:  # the unigram rows, once: added to the model's and the windows' back-off
        upper_ids = np.array([vocab.stoi.get(ch, UNK) for ch in upper], dtype=np.int64)
        rows = phrases.unigram_rows(upper_ids)
        if bi > 0 or tri > 0:
            line = phrases.line(upper_ids, rows)
            lp = line.with_separable(lp, {1: uni, 2: bi, 3: tri})
            couplings.append(PhraseCoupling(line, {2: bi, 3: tri}))
        else:
            lp = (lp + uni * rows).astype(np.float32)
    return lp, couplings


def line_scores(upper: str, lines: Sequence[str], log_probs: np.ndarray, vocab: Vocab, *, lm: CharBigramLM | None = None,
                lm_weight: float = 0.0, phrases: PhraseMemory | None = None,
                phrase_weights: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The fused scores `beam_decode` gives these lines (each as long as `upper`), float64."""
    if not lines:
        return np.zeros(0)
    lp, couplings = _fusion(upper, checked_log_probs(upper, log_probs, vocab), vocab, lm, lm_weight, phrases, phrase_weights)
    return _line_scores(lines, lp, vocab, couplings)


def beam_decode(
    upper: str,
    log_probs: np.ndarray,
    vocab: Vocab,
    *,
    top_k: int = 1,
    options: DecodeOptions = CONSTRAINED,
    lm: CharBigramLM | None = None,
    lm_weight: float = 0.0,
    phrases: PhraseMemory | None = None,
    phrase_weights: tuple[float, float, float] = (0.0, 0.0, 0.0),
    beam_size: int = 8,
) -> DecodeResult:
    """The `top_k` best lower lines for `upper` by the fused score (see the module docstring; the candidates'
    scores), under `options`; relaxes constraints like `decode` when nothing satisfies them all.

    The beam is at least `top_k` wide. With no LM or phrase memory (or zero weights) this is `decode` (exact), and
    with only the phrase unigrams it is `decode` over the model's rows plus theirs.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if lm_weight < 0 or min(phrase_weights) < 0:
        raise ValueError(f"fusion weights must be >= 0, got lm_weight={lm_weight}, phrase weights {phrase_weights}")
    if lm is not None and lm.vocab_size != len(vocab):
        raise ValueError(f"the LM has a vocabulary of {lm.vocab_size} characters, the model's has {len(vocab)}")
    if phrases is not None and phrases.vocab_size != len(vocab):
        raise ValueError(f"the phrase memory has a vocabulary of {phrases.vocab_size} characters, the model's has {len(vocab)}")
    lp, couplings = _fusion(upper, checked_log_probs(upper, log_probs, vocab), vocab, lm, lm_weight, phrases, phrase_weights)
    couplings = [c for c in couplings if not c.empty]
    if not couplings:  # nothing couples positions (e.g. no upper n-gram of the line faced anything): exact
        return decode(upper, lp, vocab, top_k=top_k, options=options)
    if not upper:
        return DecodeResult(candidates=[("", 0.0)], constraints=[])
    tables = vocab_tables(vocab)

    def attempt(current: DecodeOptions) -> tuple[list[tuple[str, float]], list[str]]:
        plan = plan_groups(upper, lp, tables, current, dtype=np.float64)  # the beam sums groups in float64
        width = max(beam_size, top_k)
        candidates = _candidates(plan, couplings, width + plan.scores.shape[0])  # other groups use < groups of them
        rows, totals = _beam_search(lp, plan, tables.stoi, couplings, width, candidates)
        scores = {}
        for row, total in zip(rows, totals.tolist()):
            scores.setdefault(_text(plan, vocab, row), total)
        greedy = _exact_best(plan, candidates, tables.stoi) if top_k == 1 else None
        if greedy is not None:  # decode's answer without its search (each group's best differs)
            exact = [(_text(plan, vocab, greedy), 0.0)]
        else:
            exact, _ = exact_kbest(upper, lp, tables, top_k, current, plan=plan)  # the plan's last use: may consume it
        missing = [line for line, _ in exact if line not in scores]
        if missing:  # decode's lines the beam pruned join the finalists, scored the same way
            scores.update(zip(missing, _line_scores(missing, lp, vocab, couplings).tolist()))
        scored = sorted(scores.items(), key=lambda item: -item[1])
        return scored[:top_k], plan.applied

    return search_relaxing(options, attempt)
