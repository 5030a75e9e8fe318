"""How a model folder answers: its decoding settings, read once, and the one place that picks the search.

    settings = read_decode_settings(model_dir, config.decode, len(vocab))   # config.json's section + decode.json
    search(upper, log_probs, vocab, settings, top_k=3)                      # exact k-best, or beam with the LM fused

A folder's decode section is config.json's (what training wrote) overlaid by decode.json (what evaluate scored
it with, so match and serve answer the way the folder was scored). With `lm_weight > 0` the folder's lower-line
LM (lm.npz), and with a `phrase_*` weight > 0 its aligned phrase memory (phrases.parquet), are fused in by
`couplet.decoding.beam.beam_decode` (with only `phrase_uni`, still the exact search); otherwise
`couplet.decoding.decode.decode` answers exactly. The Predictor holds the settings, so evaluate, `couplet match` and `couplet serve` all decode
through `search`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from couplet.core.catalog import MODEL_FILES
from couplet.core.config import DecodeConfig, config_from_dict
from couplet.data.vocab import Vocab
from couplet.decoding.constraints import CONSTRAINED, DecodeOptions, DecodeResult
from couplet.decoding.decode import decode

if TYPE_CHECKING:
    from couplet.decoding.blocklist import Blocklist
    from couplet.decoding.lm import CharBigramLM
    from couplet.decoding.phrases import PhraseMemory

__all__ = ["DecodeSettings", "line_scores", "read_decode_settings", "search"]

_BLOCKLIST_DEPTH = 256  # candidates searched for lines free of the blocklist's longer words


@dataclass(frozen=True)
class DecodeSettings:
    """A model folder's decode section, and the lower-line LM and phrase memory it fuses in (None: not used)."""

    config: DecodeConfig = field(default_factory=DecodeConfig)
    lm: CharBigramLM | None = None
    phrases: PhraseMemory | None = None

    @property
    def phrase_weights(self) -> tuple[float, float, float]:
        c = self.config
        return (c.phrase_uni, c.phrase_bi, c.phrase_tri) if self.phrases is not None else (0.0, 0.0, 0.0)

    @property
    def fused(self) -> bool:
        """Whether answers fuse the LM or the phrase memory into the model's scores."""
        return (self.lm is not None and self.config.lm_weight > 0) or any(w > 0 for w in self.phrase_weights)


def read_decode_settings(model_dir: str | Path, trained: DecodeConfig, vocab_size: int) -> DecodeSettings:
    """The settings `model_dir` answers with: `trained` (its config.json's decode section) overlaid by its
    decode.json when there is one, its lm.npz when lm_weight > 0 and its phrases.parquet when a phrase weight is > 0.
    A damaged decode.json, or a missing LM or phrase memory, is a one-line ValueError."""
    model_dir = Path(model_dir)
    section = trained
    recorded_path = model_dir / MODEL_FILES.decode
    if recorded_path.is_file():
        try:
            recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError(f"expected a JSON object, got {type(recorded).__name__}")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{recorded_path} is damaged ({exc}): "
                             "re-evaluate (couplet run --force evaluate) or delete it") from None
        # keys another version wrote and this one no longer has are dropped, as in config.json
        section = config_from_dict({"decode": {**trained.model_dump(), **recorded}}, drop_unknown=True).decode
    lm = phrases = None
    if section.lm_weight > 0:
        from couplet.decoding.lm import CharBigramLM  # scipy.sparse: only folders that fuse pay for it

        lm_path = model_dir / MODEL_FILES.lm
        if not lm_path.is_file():
            raise ValueError(f"decode.lm_weight is {section.lm_weight:g} but {lm_path} is missing: "
                             "retrain (couplet run --force train) or set decode.lm_weight=0")
        lm = CharBigramLM.load(lm_path, vocab_size=vocab_size)
    weights = {name: getattr(section, name) for name in ("phrase_uni", "phrase_bi", "phrase_tri")}
    if any(w > 0 for w in weights.values()):
        from couplet.decoding.phrases import PhraseMemory

        phrases_path = model_dir / MODEL_FILES.phrases
        if not phrases_path.is_file():
            named = ", ".join(f"decode.{k}={v:g}" for k, v in weights.items() if v > 0)
            raise ValueError(f"{named} but {phrases_path} is missing: "
                             "retrain (couplet run --force train) or set the decode.phrase_* weights to 0")
        phrases = PhraseMemory.load(phrases_path, vocab_size=vocab_size)
    return DecodeSettings(section, lm, phrases)


def line_scores(upper: str, lines: Sequence[str], log_probs: np.ndarray, vocab: Vocab, settings: DecodeSettings) -> np.ndarray:
    """The scores `search` gives these lines (each as long as `upper`) as `settings` answer, float64."""
    from couplet.decoding.beam import line_scores as fused_line_scores

    return fused_line_scores(upper, lines, log_probs, vocab, lm=settings.lm, lm_weight=settings.config.lm_weight,
                             phrases=settings.phrases, phrase_weights=settings.phrase_weights)


def _search_once(upper: str, log_probs: np.ndarray, vocab: Vocab, settings: DecodeSettings, top_k: int,
                 options: DecodeOptions) -> DecodeResult:
    if settings.fused and not options.mirror:  # the LM and the memory are of lower lines: the reverse answers exactly
        from couplet.decoding.beam import beam_decode

        return beam_decode(upper, log_probs, vocab, top_k=top_k, options=options, lm=settings.lm,
                           lm_weight=settings.config.lm_weight, phrases=settings.phrases,
                           phrase_weights=settings.phrase_weights, beam_size=max(settings.config.beam_size, top_k))
    return decode(upper, log_probs, vocab, top_k=top_k, options=options)


def search(
    upper: str,
    log_probs: np.ndarray,
    vocab: Vocab,
    settings: DecodeSettings,
    *,
    top_k: int = 1,
    options: DecodeOptions = CONSTRAINED,
    blocklist: Blocklist | None = None,
) -> DecodeResult:
    """The `top_k` best lower lines for `upper` as `settings` answer: the beam search with the LM and phrase memory
    fused in (a beam at least `top_k` wide) when they fuse one, else the exact k-best of `decode`. With a
    `blocklist` no answer contains a blocked word: its one-character words are masked like a rule, and lines with a
    longer one give way to the next best (up to `_BLOCKLIST_DEPTH` lines deep; fewer answers, or none, beyond)."""
    if blocklist is None or not blocklist.words:
        return _search_once(upper, log_probs, vocab, settings, top_k, options)
    if blocklist.single_chars:
        options = replace(options, banned=options.banned | blocklist.single_chars)
    want = top_k
    while True:
        result = _search_once(upper, log_probs, vocab, settings, want, options)
        clean = [(line, score) for line, score in result.candidates if blocklist.find(line) is None]
        if len(clean) >= top_k or len(result.candidates) < want or want >= _BLOCKLIST_DEPTH:
            result.candidates = clean[:top_k]
            return result
        want = min(want * 4, _BLOCKLIST_DEPTH)
