"""How a model folder answers: its decoding settings, read once, and the one place that picks the search.

    settings = read_decode_settings(model_dir, config.decode, len(vocab))   # config.json's section + decode.json
    search(upper, log_probs, vocab, settings, top_k=3)                      # exact k-best, or beam with the LM fused

A folder's decode section is config.json's (what training wrote) overlaid by decode.json (what evaluate scored
it with, so match and serve answer the way the folder was scored). With `lm_weight > 0` the folder's lower-line
LM (lm.npz) is fused in by `couplet.decoding.beam.beam_decode`; otherwise `couplet.decoding.decode.decode`
answers exactly. The Predictor holds the settings, so evaluate, `couplet match` and `couplet serve` all decode
through `search`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from couplet.core.catalog import MODEL_FILES
from couplet.core.config import DecodeConfig, config_from_dict
from couplet.data.vocab import Vocab
from couplet.decoding.constraints import CONSTRAINED, DecodeOptions, DecodeResult
from couplet.decoding.decode import decode

if TYPE_CHECKING:
    from couplet.decoding.lm import CharBigramLM

__all__ = ["DecodeSettings", "read_decode_settings", "search"]


@dataclass(frozen=True)
class DecodeSettings:
    """A model folder's decode section and the lower-line LM it fuses in (None: exact search)."""

    config: DecodeConfig = field(default_factory=DecodeConfig)
    lm: CharBigramLM | None = None

    @property
    def fused(self) -> bool:
        """Whether answers come from the beam search with the LM fused in."""
        return self.lm is not None and self.config.lm_weight > 0


def read_decode_settings(model_dir: str | Path, trained: DecodeConfig, vocab_size: int) -> DecodeSettings:
    """The settings `model_dir` answers with: `trained` (its config.json's decode section) overlaid by its
    decode.json when there is one, and its lm.npz when lm_weight > 0. A damaged decode.json or a missing LM
    is a one-line ValueError."""
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
    if section.lm_weight <= 0:
        return DecodeSettings(section)
    from couplet.decoding.lm import CharBigramLM  # scipy.sparse: only folders that fuse pay for it

    lm_path = model_dir / MODEL_FILES.lm
    if not lm_path.is_file():
        raise ValueError(f"decode.lm_weight is {section.lm_weight:g} but {lm_path} is missing: "
                         "retrain (couplet run --force train) or set decode.lm_weight=0")
    return DecodeSettings(section, CharBigramLM.load(lm_path, vocab_size=vocab_size))


def search(
    upper: str,
    log_probs: np.ndarray,
    vocab: Vocab,
    settings: DecodeSettings,
    *,
    top_k: int = 1,
    options: DecodeOptions = CONSTRAINED,
) -> DecodeResult:
    """The `top_k` best lower lines for `upper` as `settings` answer: the beam search with the LM fused in (a beam at
    least `top_k` wide) when they fuse one, else the exact k-best of `decode`."""
    if settings.fused:
        from couplet.decoding.beam import beam_decode

        return beam_decode(upper, log_probs, vocab, top_k=top_k, options=options, lm=settings.lm,
                           lm_weight=settings.config.lm_weight, beam_size=max(settings.config.beam_size, top_k))
    return decode(upper, log_probs, vocab, top_k=top_k, options=options)
