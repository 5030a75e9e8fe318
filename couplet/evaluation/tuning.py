"""Choosing a folder's fusion weights on the valid split (evaluate.tune_decode), never on test.

    chosen, rows = choose_decode(predictor, uppers, references, PHRASE_GRID)

Every grid point is a (phrase_uni, phrase_bi, phrase_tri) triple; the predictor's other decode settings (the
rules, the LM weight, the beam size) stay as they are. Each point decodes the same valid lines through
`Predictor.answer` (one model call per batch, shared by every point) and is scored by ideograph accuracy,
BLEU breaking ties. The phrase-memory baseline (couplet.evaluation.baseline.PhraseBaseline) is tuned the same
way over its own grid.
"""

from __future__ import annotations

import copy
import random
from dataclasses import replace as replace_settings
from typing import Sequence

from couplet.core.config import DecodeConfig
from couplet.decoding.constraints import DecodeOptions
from couplet.evaluation.metrics import corpus_bleu, ideograph_hits
from couplet.predictor import InputError, Predictor

__all__ = ["PHRASE_GRID", "BASELINE_GRID", "choose_decode", "decode_each", "sample_rows", "with_decode", "with_weights"]

Weights = tuple[float, float, float]
PHRASE_GRID: list[Weights] = [(u, b, t) for u in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0) for t in (0.0, 0.5)]
BASELINE_GRID: list[Weights] = [(0.0, b, t) for b in (0.5, 1.0) for t in (0.0, 0.5, 1.0)]  # its rows are the unigrams


def sample_rows(uppers: Sequence[str], references: Sequence[str], rows: int, seed: int) -> tuple[list[str], list[str]]:
    """At most `rows` pairs drawn without replacement (the split files are in length order: a prefix would be one length)."""
    picked = sorted(random.Random(seed).sample(range(len(uppers)), min(rows, len(uppers))))
    return [uppers[i] for i in picked], [references[i] for i in picked]


def with_decode(predictor: Predictor, phrases=None, **fields) -> Predictor:
    """A shallow copy of `predictor` (the same model and vocabulary) answering with these decode fields changed, and
    with `phrases` as its memory when given (else its own)."""
    other = copy.copy(predictor)
    config = predictor.decoding.config.model_copy(update=fields)
    other.decoding = replace_settings(predictor.decoding, config=config,
                                      phrases=phrases if phrases is not None else predictor.decoding.phrases)
    return other


def with_weights(predictor: Predictor, weights: Weights) -> Predictor:
    """A shallow copy of `predictor` answering with these phrase weights (the same model, vocabulary and memory)."""
    uni, bi, tri = weights
    return with_decode(predictor, phrase_uni=uni, phrase_bi=bi, phrase_tri=tri)


def decode_each(predictor: Predictor, uppers: Sequence[str], answerers: Sequence[tuple[Predictor, DecodeOptions]],
                batch_size: int) -> tuple[list[list[str]], int]:
    """Best line for every upper line from each (answerer, options), the answerers sharing `predictor`'s model: one
    model call per batch of equally long lines, shared by all; lines the predictor refuses get "". Also returns how
    many it refused."""
    prepared: list[str | None] = []
    for line in uppers:
        try:
            prepared.append(predictor.prepare(line, allow_unknown=True))
        except InputError:
            prepared.append(None)
    out = [[""] * len(uppers) for _ in answerers]
    by_length: dict[int, list[int]] = {}
    for i, text in enumerate(prepared):
        if text is not None:
            by_length.setdefault(len(text), []).append(i)
    for idx in by_length.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            lps = predictor.log_probs([prepared[i] for i in chunk])
            for row, i in enumerate(chunk):
                for v, (answerer, options) in enumerate(answerers):
                    out[v][i] = answerer.answer(prepared[i], lps[row], 1, options).best
    return out, sum(text is None for text in prepared)


def _decode_grid(predictor: Predictor, uppers: Sequence[str], grid: Sequence[Weights], batch_size: int) -> list[list[str]]:
    """Best lower line of every upper line for each grid point (lines the predictor refuses: "")."""
    options = predictor.decode_options(constrained=predictor.config.decode.constrained, tone=predictor.config.decode.tone)
    return decode_each(predictor, uppers, [(with_weights(predictor, weights), options) for weights in grid], batch_size)[0]


def choose_decode(
    predictor: Predictor, uppers: Sequence[str], references: Sequence[str], grid: Sequence[Weights], *, batch_size: int = 256
) -> tuple[DecodeConfig, list[dict]]:
    """The predictor's decode section with the grid point of the best ideograph accuracy (BLEU breaks ties) on
    these (valid) pairs, and one row per point: weights, ideograph_accuracy, bleu. Without a phrase memory the
    section is returned unchanged and the rows are empty."""
    if predictor.decoding.phrases is None or not uppers:
        return predictor.decoding.config, []
    refs = ["".join(r.split()) for r in references]
    ups = ["".join(u.split()) for u in uppers]
    rows = []
    for weights, predictions in zip(grid, _decode_grid(predictor, uppers, grid, batch_size)):
        hits, scored = ideograph_hits(ups, refs, predictions)
        rows.append({"phrase_uni": weights[0], "phrase_bi": weights[1], "phrase_tri": weights[2],
                     "ideograph_accuracy": hits / max(scored, 1), "bleu": corpus_bleu(refs, predictions)})
    best = max(rows, key=lambda r: (round(r["ideograph_accuracy"], 6), r["bleu"]))
    chosen = predictor.decoding.config.model_copy(
        update={key: best[key] for key in ("phrase_uni", "phrase_bi", "phrase_tri")})
    return chosen, rows
