"""One typed configuration object for the whole pipeline.

`Config` has one section per concern. It loads from YAML (`load_config`) and takes
dotted `key=value` overrides (`apply_overrides`, the syntax of `couplet run --set`).
A misspelt key or a value of the wrong type is a `ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SOURCE = "https://github.com/wb14123/couplet-dataset/releases/download/1.0/couplet.tar.gz"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass(frozen=True)
class DataConfig:
    source: str = DEFAULT_SOURCE  # URL, local .tar.gz, or a directory in the dataset's layout
    sha256: str | None = None  # expected sha256 of the archive; verified when given
    name: str = "couplet"  # raw layer folder: data/raw/<name>/<sha256 prefix>/
    max_len: int = 34  # longest line accepted by validation (the public set's longest line is 34)
    max_reject_rate: float = 0.05  # batch fails validation if more rows than this are rejected
    valid_fraction: float = 0.02  # share of the dataset's train split hashed into valid
    min_count: int = 2  # characters seen fewer times in train map to UNK (the seed uses 2)
    timeout_s: float = 30.0  # HTTP connect/read timeout
    retries: int = 3  # HTTP attempts before giving up


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 128  # the seed's character embedding size
    n_blocks: int = 6  # residual gated conv blocks (seed: 6)
    kernel_size: int = 3  # 'same' padding keeps the line length
    dropout: float = 0.25  # after the embedding, as in the seed


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    batch_size: int = 64  # couplets of one length per batch (seed: 64)
    lr: float = 1e-3  # Adam
    max_len: int = 16  # the seed drops couplets longer than 16 characters from training
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    checkpoint_every: int = 500  # steps between resumable checkpoints
    eval_every: int | None = None  # steps between validation passes; None = once per epoch
    patience: int = 3  # validation passes without improvement before early stopping
    num_threads: int | None = None  # torch CPU threads; None = torch default
    compile: bool = False  # torch.compile the model (CUDA)
    cpu_bf16: bool = False  # bf16 autocast on CPU too (fp32 weights): ~1.4x faster steps on AVX512-BF16 CPUs


@dataclass(frozen=True)
class DecodeConfig:
    constrained: bool = True  # punctuation, repetition structure and no-copy enforced
    tone: bool = False  # also require the lower line to end in a level (平) tone
    top_k: int = 1  # whole-line alternatives returned


@dataclass(frozen=True)
class EvaluateConfig:
    n_samples: int = 20  # random test couplets shown in samples.md next to the probe lines
    max_eval: int | None = None  # evaluate on at most this many test couplets (None = all)


@dataclass(frozen=True)
class PromoteConfig:
    metric: str = "bleu"  # champion/challenger metric; exact_match breaks ties
    require_baseline: bool = True  # never promote a model that does not beat the dictionary baseline on ideograph accuracy


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named sections (used in cache keys)."""
        import hashlib

        payload = {name: dataclasses.asdict(getattr(self, name)) for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` (from YAML or a `--set` string) to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, options[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """Build a Config from nested dicts, rejecting unknown keys and wrong types."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r} (known: {', '.join(sections)})")
        section_cls = typing.get_type_hints(Config)[name]
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping, got {values!r}")
        hints = _section_types(section_cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {name}.{key} (known: {', '.join(hints)})")
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        built[name] = section_cls(**kwargs)
    return Config(**built)


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
        if section not in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"unknown config section {section!r} in override {item!r}")
        section_obj = getattr(config, section)
        hints = _section_types(type(section_obj))
        if key not in hints:
            raise ConfigError(f"unknown config key {section}.{key} (known: {', '.join(hints)})")
        # YAML parsing lets `--set train.lr=1e-3` and `--set data.sha256=null` read naturally.
        parsed = yaml.safe_load(value) if value.strip() else ""
        if hints[key] is str or (typing.get_origin(hints[key]) in (typing.Union, types.UnionType) and str in typing.get_args(hints[key])):
            parsed = None if value.strip().lower() in ("none", "null") else value
        new_section = dataclasses.replace(section_obj, **{key: _coerce(parsed, hints[key], dotted)})
        config = dataclasses.replace(config, **{section: new_section})
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
