"""Where everything lives: the stage list, the folders each stage writes under `$COUPLET_HOME`,
and the layout of a model folder. The one place to read (or change) the on-disk layout.

    data/raw/<name>/<sha12>/                 ingest: the source, unchanged, with manifest.json
    data/processed/<stage>/<key>/            ingest, validate, build: outputs + manifest.json
    models/<run-id>/                         train (train.json) and evaluate (evaluation.json)
    models/registry.json                     champion/challenger decisions
    reports/validation/<run>/, reports/gx/   data-quality reports and Great Expectations Data Docs
    .locks/                                  inter-process locks
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("ingest", "validate", "build", "train", "evaluate")
DATA_STAGES = ("ingest", "validate", "build")  # their outputs go to data/processed/<stage>/<key>/
PROBE_LINES = ("晚风摇树树还挺", "今天天气不错", "鱼跃此时海", "只有香如故")  # the seed article's four probes, shown after training


@dataclass(frozen=True)
class ModelFiles:
    """The files of a model folder `models/<run-id>/`. The first three are what loading needs."""

    weights: str = "model.safetensors"
    vocab: str = "vocab.json"
    config: str = "config.json"
    checkpoints: str = "checkpoints"  # last.pt: the resumable training state
    checkpoint: str = "checkpoints/last.pt"
    metrics: str = "metrics.json"  # training curve and summary; evaluate adds "test"
    samples: str = "samples.md"  # probe outputs during training; evaluate adds its samples
    curve: str = "curve.png"
    lm: str = "lm.npz"  # the lower-line bigram LM for decode.lm_weight (couplet/lm.py), written by train
    decode: str = "decode.json"  # the decoding settings evaluate scored with; answering uses them (over config.json's)
    train_manifest: str = "train.json"  # written last by the train stage
    evaluate_manifest: str = "evaluation.json"  # written last by the evaluate stage

    @property
    def required(self) -> tuple[str, str, str]:
        return (self.weights, self.vocab, self.config)


MODEL_FILES = ModelFiles()


def is_model_dir(path: str | Path) -> bool:
    """A folder holding everything a model needs to load."""
    path = Path(path)
    return all((path / name).is_file() for name in MODEL_FILES.required)


@dataclass(frozen=True)
class Catalog:
    """Paths under one `$COUPLET_HOME`."""

    home: Path

    @property
    def raw_root(self) -> Path:
        return self.home / "data" / "raw"

    def raw_dir(self, name: str) -> Path:
        return self.raw_root / name

    def stage_dir(self, stage: str, key: str) -> Path:
        if stage not in DATA_STAGES:
            raise ValueError(f"{stage} does not write under data/processed/")
        return self.home / "data" / "processed" / stage / key

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def model_dir(self, run_id: str) -> Path:
        return self.models_dir / run_id

    @property
    def registry_path(self) -> Path:
        return self.models_dir / "registry.json"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"  # also the Great Expectations project root (reports/gx/)

    @property
    def data_docs_index(self) -> Path:
        return self.reports_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"

    def validation_report_dir(self, run_id: str) -> Path:
        return self.reports_dir / "validation" / run_id

    @property
    def validation_index(self) -> Path:
        return self.reports_dir / "validation" / "index.json"

    @property
    def locks_dir(self) -> Path:
        return self.home / ".locks"
