"""What `couplet run` reports: the one-line JSON summary of a pipeline run. The stages themselves
are `run_<stage>` in their own modules (couplet/data/ingest.py … couplet/evaluation/evaluate.py); flows/pipeline.py
wires them together. No Prefect in here."""

from __future__ import annotations

from couplet.core.config import Config, replace


def with_source(config: Config, source: str) -> Config:
    return replace(config, "data", source=source)


def summarize(results: dict[str, dict], seconds: float) -> dict:
    """The one-line JSON summary of `couplet run`."""
    summary: dict = {
        "stages": {name: {"status": r["status"], "seconds": r.get("seconds", 0.0)} for name, r in results.items()},
        "seconds": round(seconds, 3),
    }
    ingested = results.get("ingest", {})
    summary["dataset_version"] = ingested.get("dataset_version")
    counts = {}
    if "build" in results:
        counts.update(results["build"]["counts"])
    if "validate" in results:
        counts["rejected"] = results["validate"]["rejected"]
        summary["report"] = results["validate"]["report_path"]
        summary["data_docs"] = results["validate"].get("data_docs_page")
    summary["counts"] = counts
    if "build" in results:
        summary["build_dir"] = results["build"]["build_dir"]
    if "train" in results:
        summary["model"] = results["train"]["model"]
        summary["training"] = results["train"].get("training")
    if "evaluate" in results:
        summary["metrics"] = results["evaluate"]["metrics"]
        summary["baseline"] = results["evaluate"].get("baseline_metrics")  # the phrase-table baseline, same test pairs
        summary["beats_baseline"] = results["evaluate"].get("beats_baseline")
    if "promote" in results:
        summary["promotion"] = results["promote"]["promotion"]
    return summary


WRITER_MEASURES = (("reuse_rate", "reuse"), ("tone_opposition", "tone opposition"), ("pos_parallel", "POS parallel"))


def metrics_line(summary: dict) -> str | None:
    """The human summary's test-metrics line: the model beside the baseline (the phrase table's; an evaluation made
    before it: the dictionary's), flagged when the model does not beat it on ideograph accuracy (None before evaluate)."""
    metrics = summary.get("metrics")
    if not metrics:
        return None

    def scores(m: dict) -> str:
        line = f"ideograph acc {m['ideograph_accuracy']:.3f}  char acc {m['char_accuracy']:.3f}  BLEU {m['bleu']:.2f}"
        # what couplet writers judge by (couplet/evaluation/metrics.py); absent from evaluations made before them
        writers = [(label, m[key]) for key, label in WRITER_MEASURES if key in m]
        return line + "".join(f"  {label} {value:.3f}" for label, value in writers)

    name = metrics.get("baseline", "dictionary baseline")
    line = f"test    {scores(metrics)}"
    if summary.get("baseline"):
        line += f"  ({name}: {scores(summary['baseline'])})"
    if summary.get("beats_baseline") is False:
        line += f"  -- does not beat the {name}"
    return line
