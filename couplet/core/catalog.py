"""Where everything lives: the stage list, the folders each stage writes under `$COUPLET_HOME`, and
the files in each. The one place to read (or change) the on-disk layout: stages take every folder
from `Catalog` and every file name from the `*_FILES` constants below.

    data/raw/<name>/sources.json             ingest: each URL's sha256 and HTTP validators (RAW_FILES)
    data/raw/<name>/<sha12>/                 ingest: the source, unchanged (RAW_FILES)
        manifest.json, source.tar.gz, extracted/…/{train,test}/{in,out}.txt   (DATASET_LAYOUT)
    data/processed/<stage>/<key>/            ingest, validate, build: outputs + manifest.json (STAGE_MANIFEST)
        ingest/<key>/pairs.parquet                                        (INGEST_FILES)
        validate/<key>/passed.parquet, rejects.parquet, report.md         (VALIDATE_FILES)
        build/<key>/vocab.json, {train,valid,test}/len-LL.parquet         (BUILD_FILES)
    models/<run-id>/                         train (train.json) and evaluate (evaluation.json) (MODEL_FILES)
    models/registry.json                     champion/challenger decisions
    runs.json                                the flow run that last ended with each stage output (couplet/cached_run.py)
    reports/validation/index.json            every validation run
    reports/validation/<run>/                report.md, summary.json (+ rejects.parquet when it failed) (REPORT_FILES)
    reports/gx/                              the Great Expectations project and its Data Docs
    .locks/                                  inter-process locks

Records under the home (stage manifests, `train.json`, report summaries and index, the registry) name
paths relative to it (`Catalog.relative`), so a home copied or restored elsewhere still works; readers
turn them back into paths under the current home (`Catalog.resolve`), absolute ones of older records
included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote, urlparse

STAGES = ("ingest", "validate", "build", "train", "evaluate")
# The module that runs each stage, under couplet/: its syntax tree and its imports' are the stage's code version.
STAGE_MODULES = {"ingest": "data.ingest", "validate": "data.validate", "build": "data.build",
                 "train": "modelling.train", "evaluate": "evaluation.evaluate"}
DATA_STAGES = ("ingest", "validate", "build")  # their outputs go to data/processed/<stage>/<key>/
PROBE_LINES = ("晚风摇树树还挺", "今天天气不错", "鱼跃此时海", "只有香如故")  # the seed article's four probes, shown after training
# Where the layout under a home begins: an absolute path recorded under a home that is gone is re-anchored
# onto the current home from the first of these it contains (see Catalog.resolve).
LAYOUT_ROOTS = (("data", "raw"), ("data", "processed"), ("models",), ("reports",), (".locks",))


STAGE_MANIFEST = "manifest.json"  # written last in each data stage's folder by core/stage.run_cached


@dataclass(frozen=True)
class DatasetLayout:
    """The public dataset's layout: per split, `in.txt` (upper lines) and `out.txt` (lower lines)."""

    splits: tuple[str, ...] = ("train", "test")
    upper: str = "in.txt"
    lower: str = "out.txt"

    def upper_file(self, split: str) -> str:
        return f"{split}/{self.upper}"

    def lower_file(self, split: str) -> str:
        return f"{split}/{self.lower}"

    @property
    def files(self) -> tuple[str, ...]:
        """Every file of the layout, relative to its folder: train/in.txt, train/out.txt, test/in.txt, test/out.txt."""
        return tuple(name for split in self.splits for name in (self.upper_file(split), self.lower_file(split)))


DATASET_LAYOUT = DatasetLayout()


@dataclass(frozen=True)
class RawFiles:
    """The files of the raw layer: `data/raw/<name>/` (`sources`) and a dataset's `data/raw/<name>/<sha12>/`."""

    sources: str = "sources.json"  # each URL ingested: the sha256 and ETag / Last-Modified of its last download
    manifest: str = "manifest.json"  # source, sha256, layout folder, line counts
    archive: str = "source.tar.gz"  # the archive as given (directory sources have none)
    extracted: str = "extracted"  # the archive's contents
    copied_layout: str = "extracted/couplet"  # where a directory source's layout files are copied

    def dataset(self, sha256: str) -> str:
        """The folder of the dataset with this content hash, in `data/raw/<name>/`."""
        return sha256[:12]


RAW_FILES = RawFiles()


@dataclass(frozen=True)
class IngestFiles:
    """The files of `data/processed/ingest/<key>/` (and its STAGE_MANIFEST)."""

    pairs: str = "pairs.parquet"  # split, line_no, up, down


INGEST_FILES = IngestFiles()


@dataclass(frozen=True)
class ValidateFiles:
    """The files of `data/processed/validate/<key>/` (and its STAGE_MANIFEST)."""

    passed: str = "passed.parquet"  # the rows that break no rule
    rejects: str = "rejects.parquet"  # the rows that break one, with the rules they broke
    report: str = "report.md"


VALIDATE_FILES = ValidateFiles()


@dataclass(frozen=True)
class ReportFiles:
    """The files of a validation run's report folder `reports/validation/<run>/`."""

    report: str = "report.md"
    summary: str = "summary.json"
    rejects: str = "rejects.parquet"  # only when the batch failed: the failing rows, for inspection


REPORT_FILES = ReportFiles()


@dataclass(frozen=True)
class BuildFiles:
    """The files of `data/processed/build/<key>/`: the vocabulary, one shard per split and line length, and
    the STAGE_MANIFEST that lists the shards (read by `couplet.data.build.read_build_manifest`)."""

    vocab: str = "vocab.json"

    def shard(self, split: str, length: int) -> str:
        """A shard's path relative to the build folder: `train/len-07.parquet`."""
        return f"{split}/len-{length:02d}.parquet"


BUILD_FILES = BuildFiles()


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
    lm: str = "lm.npz"  # the lower-line bigram LM for decode.lm_weight (couplet/decoding/lm.py), written by train
    phrases: str = "phrases.parquet"  # the aligned phrase memory for decode.phrase_* (couplet/decoding/phrases.py), written by train
    decode: str = "decode.json"  # the decoding settings evaluate scored with; answering uses them (over config.json's)
    tuning: str = "tuning.json"  # how evaluate chose decode.json's fusion weights on the valid split (every grid point)
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


def _as_path(recorded: str | os.PathLike) -> Path:
    """A recorded path, or a `file://` URL (GX Data Docs pages), as a Path."""
    text = os.fspath(recorded)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    return Path(text)


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
    def runs_record(self) -> Path:
        return self.home / "runs.json"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def gx_project_root(self) -> Path:
        """The Great Expectations project root: GX keeps its suites, results and Data Docs in gx/ under it."""
        return self.reports_dir

    @property
    def data_docs_index(self) -> Path:
        return self.gx_project_root / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"

    def validation_report_dir(self, run_id: str) -> Path:
        return self.reports_dir / "validation" / run_id

    @property
    def validation_index(self) -> Path:
        return self.reports_dir / "validation" / "index.json"

    @property
    def locks_dir(self) -> Path:
        return self.home / ".locks"

    # ----------------------------------------------------------------------- paths in records

    def relative(self, path: str | os.PathLike) -> str:
        """How a record names `path`: relative to the home, in POSIX form (`models/<run-id>`).

        A path outside the home (a source given by the user) stays absolute; a relative one is taken
        as already recorded. `file://` URLs are accepted (recorded as the path they name).
        """
        p = _as_path(path)
        if not p.is_absolute():
            return p.as_posix()
        for base, target in ((self.home, p), (self.home.resolve(), p.resolve())):
            try:
                return target.relative_to(base).as_posix()
            except ValueError:
                continue
        return str(p)

    def resolve(self, recorded: str | os.PathLike) -> Path:
        """The path a record names, under the current home.

        Relative (what this version records): joined to the home. Absolute (an older record): the path
        itself if it exists; otherwise, when it lies under a home that has moved, its layout part
        (`data/raw/…`, `data/processed/…`, `models/…`, `reports/…`) under the current home if that
        exists; otherwise the path as recorded (so an error names it).
        """
        p = _as_path(recorded)
        if not p.is_absolute():
            return self.home / p
        if p.exists():
            return p
        parts = p.parts
        for start in range(1, len(parts)):
            if any(parts[start : start + len(root)] == root for root in LAYOUT_ROOTS):
                candidate = self.home.joinpath(*parts[start:])
                if candidate.exists():
                    return candidate
        return p

    def uri(self, recorded: str | os.PathLike) -> str:
        """A recorded path (or `file://` URL) as a `file://` URL under the current home; other URLs unchanged."""
        text = os.fspath(recorded)
        if "://" in text and not text.startswith("file://"):
            return text
        return self.resolve(text).absolute().as_uri()

    def resolved(self, record: dict, fields: Iterable[str]) -> dict:
        """A copy of `record` with each of `fields` that is set turned into an absolute path (a string)
        under the current home: what a stage returns and what people are shown."""
        return {**record, **{name: str(self.resolve(record[name])) for name in fields if record.get(name)}}
