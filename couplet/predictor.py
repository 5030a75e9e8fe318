"""The one way to ask a trained model for lower lines (下联).

    predictor = Predictor.load(resolve_model_dir(None))     # loads once
    predictor.match("春风得意马蹄疾", top_k=3)               # -> MatchResult
    predictor.match_batch(lines)                             # equal-length lines share one model call

Input is normalised (surrounding and inner whitespace removed, so the dataset's space-separated
form works; ASCII ,;:?!. become their full-width forms when only those are in the vocabulary)
and validated; anything unusable raises `InputError` with a one-line message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from couplet.core.catalog import MODEL_FILES, Catalog, is_model_dir
from couplet.core.config import Config, DataConfig, couplet_home
from couplet.decoding.constraints import DecodeOptions
from couplet.decoding.blocklist import Blocklist
from couplet.decoding.settings import DecodeSettings, read_decode_settings, search
from couplet.decoding.studio import RequestError, check_pins
from couplet.decoding.studio import alternatives as studio_alternatives
from couplet.data.punct import is_punct
from couplet.registry import RegistryError, champion_dir
from couplet.data.vocab import UNK, Vocab

_LATIN = re.compile(r"[A-Za-z0-9\uFF10-\uFF19\uFF21-\uFF3A\uFF41-\uFF5A]")
_FULL_WIDTH = {",": "，", ";": "；", ":": "：", "?": "？", "!": "！", ".": "。"}


class InputError(ValueError):
    """An upper line the model cannot answer (the message is one line, fit to show a user)."""


class ModelNotFoundError(FileNotFoundError):
    """No usable model directory."""


@dataclass(frozen=True)
class Candidate:
    lower: str
    score: float  # the line's log-probability under the model, plus the weighted LM and phrase-memory terms when fused (docs/decoding.md)


@dataclass(frozen=True)
class Alternative:
    char: str  # another character for the position
    score: float  # the score of the best line with it there (the rest of the line unchanged)


@dataclass(frozen=True)
class MatchResult:
    upper: str  # the upper line as answered (after normalisation)
    candidates: list[Candidate]  # best first
    constraints: list[str]  # couplet constraints enforced (see couplet.decoding.constraints)
    model_id: str
    relaxed: list[str] = field(default_factory=list)  # constraints dropped: nothing satisfied them, or a pin overrode them
    alternatives: list[list[Alternative]] = field(default_factory=list)  # per position of the best line, when asked
    direction: str = "down"  # "up": `upper` was a lower line and the candidates are upper lines

    @property
    def best(self) -> str:
        return self.candidates[0].lower if self.candidates else ""


# --------------------------------------------------------------------------- finding a model


def resolve_model_dir(model: str | os.PathLike | None = None) -> Path:
    """The model directory to use.

    An explicit `model` path must be a model dir (model.safetensors, vocab.json, config.json).
    Otherwise: the `champion` of `$COUPLET_HOME/models/registry.json` if that file names one,
    else the newest `$COUPLET_HOME/models/*/` holding a model.safetensors (by its mtime).
    """
    if model is not None and str(model).strip():
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model directory not found: {path}")
        missing = [name for name in MODEL_FILES.required if not (path / name).is_file()]
        if not path.is_dir() or missing:
            raise ModelNotFoundError(f"{path} is not a model directory (missing: {', '.join(missing) or 'directory'})")
        return path.resolve()
    catalog = Catalog(couplet_home())
    try:
        champion = champion_dir(catalog.home, strict=True)
    except RegistryError as exc:
        raise ModelNotFoundError(str(exc)) from None
    if champion is not None:
        return champion.resolve()
    models = catalog.models_dir
    found = []
    if models.is_dir():
        for child in models.iterdir():
            weights = child / MODEL_FILES.weights
            if child.name.startswith(".") or not weights.is_file():
                continue
            found.append((weights.stat().st_mtime, child.name, child))
    if not found:
        raise ModelNotFoundError(f"no trained model found under {models}; run `couplet run --until train` first")
    return max(found)[2].resolve()


# --------------------------------------------------------------------------- the predictor


class Predictor:
    """A loaded labeller plus its vocabulary and decoding settings; answers upper lines with decoded lower lines.

    `decoding` is how it answers (default: `config.decode` without an LM, i.e. the exact search); `load` reads a
    folder's, and puts the same section in `config.decode`.
    """

    def __init__(self, model, vocab: Vocab, config: Config | None = None, *, model_id: str = "unknown", device: str = "cpu",
                 decoding: DecodeSettings | None = None, blocklist: Blocklist | None = None):
        self.model = model
        self.vocab = vocab
        self.config = config if config is not None else Config()
        self.model_id = model_id
        self.device = device
        self.decoding = decoding if decoding is not None else DecodeSettings(self.config.decode)
        self.blocklist = blocklist  # words no answer contains (and, with decode.block_input, no question)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "cpu", num_threads: int | None = None,
             blocklist: str | os.PathLike | None = None) -> "Predictor":
        """Load a model dir once. `num_threads` sets torch's CPU threads (None: leave as is). `blocklist`: a word list
        added to the folder's (decode.default_blocklist, decode.blocklist); a bad file is a one-line ValueError."""
        import torch

        from couplet.modelling.model import load_labeller

        path = Path(model_dir)
        if not is_model_dir(path):
            raise ModelNotFoundError(f"{path} is not a model directory (needs {', '.join(MODEL_FILES.required)})")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        model, vocab, config = load_labeller(path, device=device)
        if config.model.word_features:  # jieba's dictionary now (~1 s), not on the first request
            from couplet.data.wordtags import posseg_module

            posseg_module()
        decoding = read_decode_settings(path, config.decode, len(vocab))
        config = config.model_copy(update={"decode": decoding.config})
        words = Blocklist.for_settings(decoding.config.default_blocklist, decoding.config.blocklist, blocklist)
        return cls(model, vocab, config, model_id=path.resolve().name, device=device, decoding=decoding, blocklist=words)

    @property
    def max_len(self) -> int:
        data = getattr(self.config, "data", None)
        return int(getattr(data, "max_len", DataConfig().max_len))

    # ----------------------------------------------------------------- input

    def prepare(self, upper: str, *, allow_unknown: bool = False) -> str:
        """Normalise and validate one upper line; raises InputError. `allow_unknown` lets OOV characters through (as UNK)."""
        if not isinstance(upper, str):
            raise InputError(f"input must be text, got {type(upper).__name__}")
        text = "".join(upper.split())
        if not text:
            raise InputError("empty input: give an upper line (上联) of Chinese characters")
        latin = list(dict.fromkeys(_LATIN.findall(text)))
        if latin:
            raise InputError(
                f"input must be Chinese characters; found Latin letters or digits: {', '.join(latin)}"
            )
        if len(text) > self.max_len:
            raise InputError(f"input is {len(text)} characters long; this model accepts at most {self.max_len}")
        stoi = self.vocab.stoi
        if any(ch in _FULL_WIDTH for ch in text):
            text = "".join(
                _FULL_WIDTH[ch] if ch in _FULL_WIDTH and ch not in stoi and _FULL_WIDTH[ch] in stoi else ch for ch in text
            )
        if not allow_unknown and self.blocklist is not None and self.config.decode.block_input:
            blocked = self.blocklist.find(text)
            if blocked is not None:
                raise InputError(f"the line contains a blocked word ({blocked}); set decode.block_input=false to answer it anyway")
        if not allow_unknown:
            # Punctuation outside the vocabulary is fine: the decoder copies a mark to its position.
            unknown = [ch for ch in dict.fromkeys(text) if (ch not in stoi or stoi[ch] < 2) and not is_punct(ch)]
            if unknown:
                raise InputError(f"characters not in the model's vocabulary: {', '.join(unknown)}")
        return text

    # ----------------------------------------------------------------- model

    def log_probs(self, lines: Sequence[str], direction: Literal["down", "up"] = "down") -> np.ndarray:
        """(B, L, V) float32 log-probabilities for equally long, already prepared lines. `direction` "down": the lines
        are upper lines, answered with lower ones; "up": lower lines answered with upper ones (a model trained with
        model.directions=2, train.swapped_pairs; others raise InputError)."""
        import torch

        if direction not in ("down", "up"):
            raise InputError(f"direction must be down or up, got {direction!r}")
        directions = getattr(getattr(self.model, "cfg", None), "directions", 1)
        if direction == "up" and directions != 2:
            raise InputError("this model answers only upper → lower; retrain with model.directions=2 and "
                             "train.swapped_pairs=true for the other direction")
        if not lines:
            return np.zeros((0, 0, len(self.vocab)), dtype=np.float32)
        stoi = self.vocab.stoi
        ids = torch.tensor([[stoi.get(ch, UNK) for ch in line] for line in lines], dtype=torch.long)
        with torch.inference_mode():
            ids = ids.to(self.device) if self.device != "cpu" else ids
            extra = _word_tags(self.model, lines, ids.device)  # {"tags": (B, L)} with model.word_features, else {}
            if direction == "up":  # the direction marker's row 1, every line
                out = self.model.log_probs(ids, direction=torch.ones(len(lines), dtype=torch.long, device=ids.device), **extra)
            else:
                out = self.model.log_probs(ids, **extra)
            out = out.float()
            if out.device.type != "cpu":
                out = out.cpu()
            return out.numpy()

    # ----------------------------------------------------------------- answering

    def decode_options(self, constrained: bool = True, tone: bool = False) -> DecodeOptions:
        """The rules an answer with these flags enforces: `constrained` switches no-copy, punctuation and repetition,
        and no-reuse with them where this predictor's `decoding` says `no_reuse` (a folder written before the field
        existed: off); `tone` is separate."""
        return DecodeOptions.from_flags(constrained=constrained, tone=tone, no_reuse=self.decoding.config.no_reuse)

    def _options(self, constrained: bool, tone: bool, options: DecodeOptions | None, direction: str = "down") -> DecodeOptions:
        chosen = options if options is not None else self.decode_options(constrained, tone)
        return dataclass_replace(chosen, mirror=True) if direction == "up" else chosen

    def answer(self, upper: str, log_probs: np.ndarray, top_k: int, options: DecodeOptions, *,
               pins: Mapping[int, str] | None = None, alternatives: int = 0) -> MatchResult:
        """Decode a prepared line from its (L, V) log-probabilities as this predictor's `decoding` says, with no
        blocked word, the `pins` (position -> character, couplet.decoding.studio) and, per position of the best line,
        up to `alternatives` other characters. An impossible pin or request is an InputError."""
        if self.blocklist is not None and self.blocklist.single_chars:  # masked like a rule; a blocked pin is refused
            options = dataclass_replace(options, banned=options.banned | self.blocklist.single_chars)
        try:
            pinned, given_way = check_pins(upper, dict(pins or {}), self.vocab, options)
            res = search(upper, log_probs, self.vocab, self.decoding, top_k=top_k, options=pinned, blocklist=self.blocklist)
            others = []
            if alternatives and res.candidates:
                found = studio_alternatives(upper, log_probs, self.vocab, self.decoding, pinned, res.candidates[0][0],
                                            alternatives, self.blocklist)
                others = [[Alternative(ch, score) for ch, score in position] for position in found]
        except RequestError as exc:
            raise InputError(str(exc)) from None
        return MatchResult(
            upper=upper,
            candidates=[Candidate(lower, score) for lower, score in res.candidates],
            constraints=res.constraints,
            model_id=self.model_id,
            relaxed=[*given_way, *res.relaxed],
            alternatives=others,
            direction="up" if options.mirror else "down",
        )

    def match(
        self,
        upper: str,
        top_k: int = 1,
        constrained: bool = True,
        tone: bool = False,
        *,
        options: DecodeOptions | None = None,
        allow_unknown: bool = False,
        direction: Literal["down", "up"] = "down",
        pins: Mapping[int, str] | None = None,
        alternatives: int = 0,
    ) -> MatchResult:
        """The `top_k` best lower lines for one upper line. `options` (if given) overrides constrained/tone (and the
        folder's no_reuse, see `decode_options`). direction="up": `upper` is a lower line, answered with upper lines
        (see `log_probs`; the tone rule mirrored). `pins` and `alternatives`: see `answer`."""
        _check_top_k(top_k)
        text = self.prepare(upper, allow_unknown=allow_unknown)
        lp = self.log_probs([text], direction=direction)[0]
        return self.answer(text, lp, top_k, self._options(constrained, tone, options, direction), pins=pins,
                           alternatives=alternatives)

    def match_batch(
        self,
        uppers: Sequence[str],
        top_k: int = 1,
        constrained: bool = True,
        tone: bool = False,
        *,
        options: DecodeOptions | None = None,
        allow_unknown: bool = False,
        errors: Literal["raise", "return"] = "raise",
        batch_size: int = 512,
        direction: Literal["down", "up"] = "down",
    ) -> list[MatchResult | InputError]:
        """Answer many lines; equal-length lines share model calls of up to `batch_size` lines.

        Results come back in input order. A bad line raises its InputError (errors="raise", the
        default) or is answered by the InputError object in its slot (errors="return"). `direction` as in `match`;
        a model that cannot answer it raises InputError, whatever `errors` says.
        """
        _check_top_k(top_k)
        self.log_probs([], direction=direction)  # a direction this model cannot answer raises here, once
        opts = self._options(constrained, tone, options, direction)
        results: list[MatchResult | InputError | None] = [None] * len(uppers)
        by_length: dict[int, list[tuple[int, str]]] = {}
        for i, raw in enumerate(uppers):
            try:
                text = self.prepare(raw, allow_unknown=allow_unknown)
            except InputError as exc:
                if errors == "raise":
                    raise
                results[i] = exc
                continue
            by_length.setdefault(len(text), []).append((i, text))
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                lp = self.log_probs([text for _, text in chunk], direction=direction)
                for row, (i, text) in enumerate(chunk):
                    results[i] = self.answer(text, lp[row], top_k, opts)
        return results  # type: ignore[return-value]


def _word_tags(model, lines: Sequence[str], device) -> dict:
    """The lines' word tags for a model with model.word_features ({"tags": (B, L) tensor}, computed from the lines
    as the build computed them for training), else {}."""
    if not getattr(getattr(model, "cfg", None), "word_features", False):
        return {}
    import torch

    from couplet.data.wordtags import tag_matrix

    return {"tags": torch.from_numpy(tag_matrix(lines, cached=True)).to(device)}


def _check_top_k(top_k: int) -> None:
    if not isinstance(top_k, int) or top_k < 1 or top_k > 100:
        raise InputError(f"top_k must be an integer from 1 to 100, got {top_k!r}")
