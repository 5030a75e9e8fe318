"""What `couplet run` reports (couplet/summary.py), from the stages' results alone: no Prefect, no files."""

from __future__ import annotations

from couplet.core.config import Config
from couplet.summary import metrics_line, summarize, with_source

SCORES = {"ideograph_accuracy": 0.5, "char_accuracy": 0.625, "bleu": 12.5}
BASELINE = {"ideograph_accuracy": 1.0, "char_accuracy": 1.0, "bleu": 100.0}


def _results() -> dict[str, dict]:
    return {
        "ingest": {"status": "cached", "seconds": 0.1, "dataset_version": "v1"},
        "validate": {"status": "cached", "rejected": 2, "report_path": "/h/reports/validation/r1/report.md",
                     "data_docs_page": "file:///h/reports/gx/index.html"},
        "build": {"status": "completed", "seconds": 1.5, "counts": {"train": 90, "valid": 10, "test": 20}, "build_dir": "/h/b"},
        "train": {"status": "completed", "model": "/h/models/run-1", "training": {"steps": 40}},
        "evaluate": {"status": "completed", "metrics": SCORES, "baseline_metrics": BASELINE, "beats_baseline": False},
        "promote": {"status": "completed", "promotion": {"promoted": False}},
    }


def test_summary_gathers_every_stages_outputs():
    summary = summarize(_results(), seconds=3.14159)
    assert summary["stages"]["ingest"] == {"status": "cached", "seconds": 0.1}
    assert summary["stages"]["train"] == {"status": "completed", "seconds": 0.0}  # a stage that reported no time
    assert list(summary["stages"]) == ["ingest", "validate", "build", "train", "evaluate", "promote"]
    assert summary["seconds"] == 3.142 and summary["dataset_version"] == "v1"
    assert summary["counts"] == {"train": 90, "valid": 10, "test": 20, "rejected": 2}
    assert summary["report"].endswith("report.md") and summary["data_docs"].startswith("file://")
    assert summary["build_dir"] == "/h/b" and summary["model"] == "/h/models/run-1" and summary["training"] == {"steps": 40}
    assert summary["metrics"] == SCORES and summary["baseline"] == BASELINE and summary["beats_baseline"] is False
    assert summary["promotion"] == {"promoted": False}


def test_summary_of_the_data_stages_only_has_no_model_fields():
    results = {name: r for name, r in _results().items() if name in ("ingest", "validate", "build")}
    summary = summarize(results, seconds=1.0)
    assert summary["counts"]["rejected"] == 2 and summary["build_dir"] == "/h/b"
    assert not {"model", "metrics", "promotion"} & set(summary)
    assert metrics_line(summary) is None


def test_metrics_line_sets_the_model_beside_the_baseline_and_flags_a_loss():
    line = metrics_line(summarize(_results(), seconds=1.0))
    assert line.startswith("test    ideograph acc 0.500  char acc 0.625  BLEU 12.50")
    assert "(dictionary baseline: ideograph acc 1.000" in line and line.endswith("does not beat the dictionary baseline")
    winning = metrics_line({"metrics": SCORES, "beats_baseline": True})
    assert winning == "test    ideograph acc 0.500  char acc 0.625  BLEU 12.50"


def test_with_source_replaces_only_the_source():
    config = with_source(Config(), "/drop/couplet.tar.gz")
    assert config.data.source == "/drop/couplet.tar.gz"
    assert config.model == Config().model and config.data.max_len == Config().data.max_len


def test_metrics_line_shows_the_writers_measures_when_the_evaluation_has_them():
    measured = {**SCORES, "reuse_rate": 0.01, "tone_opposition": 0.8, "pos_parallel": 0.44}
    line = metrics_line({"metrics": measured, "baseline": {**BASELINE, "reuse_rate": 0.0}, "beats_baseline": True})
    assert line.startswith("test    ideograph acc 0.500  char acc 0.625  BLEU 12.50  reuse 0.010  tone opposition 0.800  POS parallel 0.440")
    assert "(dictionary baseline: ideograph acc 1.000  char acc 1.000  BLEU 100.00  reuse 0.000)" in line
