"""One typed configuration object for the whole pipeline.

`Config` has one section per concern: frozen pydantic models that refuse unknown keys. It loads
from YAML (`load_config`) and takes dotted `key=value` overrides (`apply_overrides`, the syntax of
`couplet run --set`). A misspelt key or a value of the wrong type is a one-line `ConfigError` naming it.
Change a value with `replace(config, "train", max_steps=300)`.

A field's rules live on the field, here: `setting(default, former=..., on_resume=...)` says what an old model folder
lacking it meant and whether a checkpoint survives a change of it; the model loader and the resume check read them.
Adding a field is a change to this file plus its use; a new `ModelKind` also needs its class in couplet/modelling/model.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_SOURCE = "https://github.com/wb14123/couplet-dataset/releases/download/1.0/couplet.tar.gz"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


_NO_FORMER = object()


def setting(default: Any, *, former: Any = _NO_FORMER, on_resume: Literal["fixed", "may change"] = "fixed", **constraints: Any) -> Any:
    """A field with its default and its rules across versions and resumes (pydantic `Field` constraints pass through).

    `former`: the value a model folder's config.json that lacks the field meant (a folder written before the field
    existed was made with the former behaviour); declared where `default` is not, or may not stay, that behaviour.
    Read by `with_former_defaults`. `on_resume="may change"` (read by `may_change_on_resume`): a
    model or train field that changes how long or how a run goes, not its trajectory, so a checkpoint stays
    valid across it (other sections never bind a checkpoint).
    """
    rules = {"on_resume": on_resume} | ({} if former is _NO_FORMER else {"former": former})
    return Field(default=default, json_schema_extra=rules, **constraints)


def _base_type(annotation: Any) -> Any:
    """int for `int`, str for `str | None`."""
    return next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)


class _Section(BaseModel):
    # Lax parsing turns "300", "1e-3", "true" (YAML or --set) into the field's type; numbers given
    # for a string field become strings (data.source=123).
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _before(cls, value: Any, info) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in typing.get_args(annotation):
            raise ValueError("a boolean is not a number")  # pydantic would read true as 1
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null") and type(None) in typing.get_args(annotation):
            return None  # an optional field is cleared by an empty value (--set train.max_steps=)
        return value


class DataConfig(_Section):
    source: str = DEFAULT_SOURCE  # URL, local .tar.gz, or a directory in the dataset's layout
    sha256: str | None = None  # expected sha256 of the archive; verified when given
    name: str = "couplet"  # raw layer folder: data/raw/<name>/<sha256 prefix>/
    max_len: int = 34  # longest line accepted by validation (the public set's longest line is 34)
    max_reject_rate: float = 0.05  # batch fails validation if more rows than this are rejected
    valid_fraction: float = 0.02  # share of the dataset's train split hashed into valid
    min_count: int = 2  # characters seen fewer times in train map to UNK (the seed uses 2)
    timeout_s: float = 30.0  # HTTP connect/read timeout
    retries: int = 3  # HTTP attempts before giving up
    # a second dataset in the same layout (URL, .tar.gz or directory) whose train split is added to training as the
    # build's `extra` shards, down-weighted by train.extra_share (couplet/data/extra.py); valid, test and the
    # vocabulary stay the primary source's. None: off
    extra_source: str | None = setting(None, former=None)
    # store each line's jieba word tags in the build's shards (couplet/data/wordtags.py; the build of poetry-couplets'
    # 242k pairs took 21 s instead of 3), which model.word_features reads; on with it since it won on valid
    word_tags: bool = setting(True, former=False)


# the labeller kinds, each a class in couplet/modelling/model.py (LABELLERS)
ModelKind = Literal["gated_cnn", "refine", "attention"]
MODEL_KINDS: tuple[str, ...] = typing.get_args(ModelKind)


class ModelConfig(_Section):
    # gated_cnn: the seed's labeller. refine: the same, then `refine_blocks` more gated blocks that relabel each
    # position seeing the first pass's own answer (see couplet/modelling/model.py and docs/design.md)
    # attention: the same, then `attn_layers` bidirectional self-attention layers over the whole line
    # Default: attention, the lowest valid loss of the 45-minute ablation (docs/benchmarks.md); configs/seed.yaml: gated_cnn
    kind: ModelKind = setting("attention", former="gated_cnn")
    embed_dim: int = 128  # the seed's character embedding size
    n_blocks: int = 6  # residual gated conv blocks (seed: 6)
    kernel_size: int = 3  # 'same' padding keeps the line length
    dropout: float = 0.25  # after the embedding, as in the seed
    refine_blocks: int = Field(default=3, ge=1)  # refine kind only: gated blocks of the relabelling pass
    attn_layers: int = Field(default=2, ge=1)  # attention kind only: self-attention layers after the gated blocks
    attn_heads: int = Field(default=4, ge=1)  # attention kind only: heads per layer (must divide embed_dim)
    attn_dropout: float = Field(default=0.1, ge=0, lt=1)  # attention kind only: dropout inside the attention layers
    # 2: a learnt direction embedding (0 "down": upper -> lower, 1 "up": lower -> upper) is added to the character
    # embedding, so one model answers both ways (train.swapped_pairs); 1: none, a folder written before the field
    directions: int = setting(2, former=1, ge=1, le=2)
    # the output layer. full: one softmax over the whole vocabulary (the seed). adaptive: torch's adaptive softmax
    # (Grave et al. 2017) over the frequency-sorted vocabulary: a head softmax over the most frequent ids plus one
    # entry per tail cluster, each cluster a smaller softmax behind its own projection; exact log-probabilities,
    # cheaper training on CPU (docs/benchmarks.md "Output layer")
    # default adaptive: the lowest valid loss of issue 20's 45-minute runs (docs/benchmarks.md "Quality levers")
    output: Literal["full", "adaptive"] = setting("adaptive", former="full")
    # (adaptive_cutoffs, adaptive_div: their former values are this default's, so an old checkpoint's fingerprint,
    # which lacks them, still matches; they mean nothing with output=full)
    # adaptive only: where the head and each tail cluster end, as shares of the vocabulary size (increasing, in
    # (0, 1)); 1/8 and 1/3 hold ~80% and ~95% of poetry-couplets' training characters
    adaptive_cutoffs: tuple[float, ...] = setting((0.125, 0.33), former=(0.125, 0.33), min_length=1)
    # adaptive only: tail cluster i projects to embed_dim / adaptive_div**(i + 1) dimensions (torch's div_value);
    # 1 (full width) matched the full layer's valid loss at equal steps, 2 was 0.02 nats worse at 2,000 steps
    adaptive_div: float = setting(1.0, former=1.0, ge=1)
    # a learnt embedding of each input character's jieba word tag (its place B/M/E/S in its word and the word's
    # coarse part of speech; punctuation its own tag: couplet/data/wordtags.py) added to the character embedding.
    # Training reads the build's tags (needs data.word_tags=true; checked where training starts); answering computes
    # them from the line itself. Off: no such parameter, the state dict as before. On by default: valid loss 5.255
    # against 5.272 in the 45-minute runs (docs/benchmarks.md "Quality levers")
    word_features: bool = setting(True, former=False)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.kind == "attention" and self.embed_dim % self.attn_heads:
            raise ValueError(f"model.attn_heads ({self.attn_heads}) must divide model.embed_dim ({self.embed_dim})")
        return self

    @model_validator(mode="after")
    def _cutoffs_increase(self):
        cuts = self.adaptive_cutoffs
        if any(not 0 < c < 1 for c in cuts) or any(a >= b for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"model.adaptive_cutoffs {list(cuts)} must be increasing shares of the vocabulary, each in (0, 1)")
        if self.embed_dim // self.adaptive_div ** len(cuts) < 1:
            raise ValueError(f"model.adaptive_div ({self.adaptive_div}) leaves the last tail cluster of model.embed_dim "
                             f"({self.embed_dim}) no dimension: lower it or use fewer model.adaptive_cutoffs")
        return self


class TrainConfig(_Section):
    epochs: int = setting(10, on_resume="may change")
    max_steps: int | None = setting(None, on_resume="may change")  # stop after this many optimiser steps (overrides epochs)
    # stop after this much time in training steps (a budget), keeping the best weights; 45 fits the default
    # (10 epochs of poetry-couplets need ~37 min on 2 AVX2 cores) and ends a slower machine's run in time
    max_minutes: float | None = setting(45.0, former=None, gt=0)
    batch_size: int = 64  # couplets of one length per batch (seed: 64)
    lr: float = 1e-3  # Adam
    # constant (the seed) or cosine: linear warm-up over warmup_steps, then cosine decay to 0 at the end of the
    # run (the end being epochs/max_steps, or max_minutes when that comes first). Default: cosine, warm-up 500
    # (at most a tenth of the run) and the weights' moving average, which won the budgeted ablation (docs/benchmarks.md)
    lr_schedule: Literal["constant", "cosine"] = setting("cosine", former="constant")
    warmup_steps: int = setting(500, former=0, ge=0)
    ema_decay: float | None = setting(0.999, former=None, gt=0, lt=1)  # validate and keep an exponential moving average of the weights (decay warmed up, see train.ema_update)
    max_len: int = 16  # the seed drops couplets longer than 16 characters from training
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    checkpoint_every: int = setting(500, on_resume="may change")  # steps between resumable checkpoints
    eval_every: int | None = None  # steps between validation passes; None = once per epoch
    patience: int = setting(3, on_resume="may change")  # validation passes without improvement before early stopping
    num_threads: int | None = setting(None, on_resume="may change")  # torch CPU threads; None = torch default
    # processes (torchrun + DistributedDataParallel; gloo on CPU, NCCL with one GPU each); each global batch of
    # batch_size is split across them, so batch_size must be a multiple of nproc. 1 = one process, no process
    # group, couplet.modelling.distributed never loaded (couplet/modelling/distributed.py, docs/operate.md "Training on several processes, GPUs or machines")
    nproc: int = setting(1, on_resume="may change", ge=1)  # a checkpoint holds the global batch position
    compile: bool = False  # torch.compile the model (CUDA)
    # bf16 autocast on CPU too (fp32 weights): ~1.4x faster steps on CPUs with native bf16 (AVX512-BF16/AMX),
    # ~30x slower on AVX2-only ones; "auto" turns it on only where the CPU has it
    cpu_bf16: Literal["auto"] | bool = "auto"
    # also train on every train pair's swap (lower line in, upper line out) marked with direction 1 "up": twice the
    # rows per epoch, one model for both directions; needs model.directions=2 (checked where training starts).
    # Validation stays on the valid split's upper -> lower direction
    swapped_pairs: bool = setting(True, former=False)
    # with a build that has extra shards (data.extra_source): the share of each epoch's training rows drawn from them,
    # a fresh sample every epoch (the primary train split is seen once per epoch); 0 ignores them
    extra_share: float = setting(0.3, former=0.0, ge=0, lt=1)


class DecodeConfig(_Section):
    constrained: bool = True  # punctuation, repetition structure and no-copy enforced
    tone: bool = False  # also require the lower line to end in a level (平) tone
    # 不重字: with `constrained`, no ideograph of the upper line anywhere in the lower line (docs/decoding.md); a
    # folder written before the field existed answers without it
    no_reuse: bool = setting(True, former=False)
    # shallow fusion of the lower-line bigram LM trained with the model: score = model + lm_weight * LM, searched
    # by beam over positions (couplet/decoding/beam.py); 0 = off, the exact k-best search of couplet/decoding/decode.py
    lm_weight: float = setting(0.0, former=0.0, ge=0)
    beam_size: int = Field(default=8, ge=1)  # beam width when lm_weight or a phrase weight above unigrams is > 0
    # the aligned phrase memory of the train split (couplet/decoding/phrases.py, phrases.parquet in the model folder):
    # score += phrase_uni * sum log p(lower char | upper char) + phrase_bi * (the same for aligned bigrams) +
    # phrase_tri * (trigrams); evaluate picks them on the valid split (evaluate.tune_decode) and records them in
    # decode.json. A folder written before the fields existed answers without the memory
    # 0 until evaluate chooses them (a trained, unevaluated folder answers without the memory); valid chose 0/0.5/0.5
    # for the default model (docs/benchmarks.md "Quality levers")
    phrase_uni: float = setting(0.0, former=0.0, ge=0)
    phrase_bi: float = setting(0.0, former=0.0, ge=0)
    phrase_tri: float = setting(0.0, former=0.0, ge=0)
    # words no answer may contain (couplet/decoding/blocklist.py): the shipped list of common vulgar words unless
    # default_blocklist is off, plus `blocklist` (a UTF-8 file, one word per line) when set; with block_input an
    # upper line containing one is refused. A folder written before the fields existed answers without a blocklist
    default_blocklist: bool = setting(True, former=False)
    blocklist: str | None = None
    block_input: bool = setting(True, former=False)


class EvaluateConfig(_Section):
    n_samples: int = 20  # random test couplets shown in samples.md next to the probe lines
    max_eval: int | None = None  # evaluate on at most this many test couplets (None = all)
    # choose decode.phrase_* (and lm_weight when the LM is on) on the valid split, for ideograph accuracy with BLEU as
    # the tie-break, over couplet.evaluation.tuning's grid; the choice goes to decode.json
    tune_decode: bool = setting(True, former=False)
    tune_rows: int = Field(default=2000, ge=1)  # valid couplets the choice is scored on


class PromoteConfig(_Section):
    metric: str = "bleu"  # champion/challenger metric; exact_match breaks ties
    require_baseline: bool = True  # never promote a model that does not beat the phrase-table baseline on ideograph accuracy


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named sections (used in cache keys)."""
        payload = {name: getattr(self, name).model_dump() for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS: dict[str, type[_Section]] = {name: field.annotation for name, field in Config.model_fields.items()}
_EXPECTED = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}


def _rules(section: str) -> dict[str, dict[str, Any]]:
    """{field: its `setting` rules} of a section; a plain field has none."""
    return {name: field.json_schema_extra or {} for name, field in SECTIONS[section].model_fields.items()}  # type: ignore[misc]


def with_former_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a model folder's config.json) with each field it lacks set to the field's `former` value."""
    filled = dict(raw)
    for name in SECTIONS:
        if isinstance(raw.get(name), dict):
            formers = {key: rules["former"] for key, rules in _rules(name).items() if "former" in rules}
            filled[name] = {**formers, **raw[name]}
    return filled


def may_change_on_resume(section: str) -> frozenset[str]:
    """The fields of `section` declared `on_resume="may change"`: a checkpoint stays valid across them."""
    return frozenset(key for key, rules in _rules(section).items() if rules.get("on_resume") == "may change")


def _expected(annotation: Any) -> str | None:
    """What a field takes, in words: "an integer", or "auto or true/false" for Literal["auto"] | bool."""
    args = typing.get_args(annotation)
    literals = [str(v) for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
    if literals:
        return " or ".join(literals + (["true/false"] if bool in args else []))
    return _EXPECTED.get(_base_type(annotation))


def _error(section: str, exc: ValidationError) -> ConfigError:
    """pydantic's first error as one line naming the dotted key."""
    error = exc.errors()[0]
    key = str(error["loc"][0]) if error["loc"] else ""
    known = SECTIONS[section].model_fields
    if error["type"] == "extra_forbidden":
        return ConfigError(f"unknown config key {section}.{key} (known: {', '.join(known)})")
    expected = _expected(known[key].annotation) if key in known else None
    if expected and not error["type"].startswith(("greater_than", "less_than")):  # a range error says the range
        return ConfigError(f"{section}.{key}: expected {expected}, got {error.get('input')!r}")
    if not key:  # a check across fields: the message names them
        return ConfigError(f"{section}: {error['msg'].removeprefix('Value error, ')}")
    return ConfigError(f"{section}.{key}: {error['msg']}")


def _section(name: str, values: Any) -> _Section:
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section {name!r} (known: {', '.join(SECTIONS)})")
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping, got {values!r}")
    try:
        return SECTIONS[name].model_validate(values)
    except ValidationError as exc:
        raise _error(name, exc) from None


def config_from_dict(raw: dict[str, Any] | None, *, drop_unknown: bool = False) -> Config:
    """Build a Config from nested dicts, rejecting unknown keys and wrong types.

    `drop_unknown=True` reads a config saved by another version (a model folder's config.json):
    sections and keys this version no longer has are ignored instead of refused.
    """
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    if drop_unknown:
        raw = {name: {k: v for k, v in values.items() if k in SECTIONS[name].model_fields}
               for name, values in raw.items() if name in SECTIONS and isinstance(values, dict)}
    return Config(**{name: _section(name, values) for name, values in raw.items()})


def replace(config: Config, section: str, **values: Any) -> Config:
    """A copy of `config` with `values` set in `section`, validated like an override."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} (known: {', '.join(SECTIONS)})")
    current = getattr(config, section).model_dump()
    return config.model_copy(update={section: _section(section, {**current, **values})})


def apply_overrides(config: Config, overrides: list[str] | None) -> Config:
    """Apply `section.key=value` strings (the syntax of `couplet run --set`)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key {dotted!r} must be section.key, e.g. train.max_steps")
        section, key = parts
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in override {item!r}")
        field = SECTIONS[section].model_fields.get(key)
        if field is None:
            raise ConfigError(f"unknown config key {section}.{key} (known: {', '.join(SECTIONS[section].model_fields)})")
        if value.strip().lower() in ("none", "null"):
            parsed: Any = None
        elif _base_type(field.annotation) is str:
            parsed = value  # a string field takes the text as written (data.source=123 stays "123")
        else:
            try:
                parsed = yaml.safe_load(value) if value.strip() else ""  # YAML reads 1e-3, true, 300 naturally
            except yaml.YAMLError:
                parsed = value  # not YAML ("[oops"): the type check below names the key
        config = replace(config, section, **{key: parsed})
    return config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file (optional) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return apply_overrides(config_from_dict(raw), overrides)


def couplet_home() -> Path:
    """Root of everything the pipeline writes ($COUPLET_HOME, default: the current directory)."""
    return Path(os.environ.get("COUPLET_HOME") or os.getcwd()).resolve()
