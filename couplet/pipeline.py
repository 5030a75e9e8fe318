"""Stage entry points that take the one `Config`, and the run summary. No Prefect in here:
`flows/pipeline.py` wraps these in tasks, and tests can call them directly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from couplet.build import run_build
from couplet.config import Config
from couplet.ingest import run_ingest
from couplet.validate import run_validate

STAGES = ("ingest", "validate", "build", "train", "evaluate")


def with_source(config: Config, source: str) -> Config:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, source=source))


def ingest(config: Config, home: Path, force: bool = False) -> dict:
    return run_ingest(config.data, home, force=force)


def validate(ingested: dict, config: Config, home: Path, force: bool = False, flow_run_id: str | None = None) -> dict:
    return run_validate(ingested, config.data, home, force=force, flow_run_id=flow_run_id)


def build(validated: dict, config: Config, home: Path, force: bool = False) -> dict:
    return run_build(validated, config.data, home, force=force)


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
    for key in ("model", "metrics", "promotion"):
        for r in results.values():
            if key in r:
                summary[key] = r[key]
    return summary
