"""The couplet pipeline as Prefect flows. Only orchestration lives here; every stage is a plain
function in `couplet/` that does its own content-addressed caching and returns a small manifest.

A stage whose output already exists for its cache key ends in a Completed state named `Cached`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.states import Completed

from couplet import pipeline as stages
from couplet import registry
from couplet.config import Config, couplet_home, load_config
from couplet.validate import ValidationFailed
from flows.promote import promote_model

Stage = Literal["ingest", "validate", "build", "train", "evaluate"]


def _finish(result: dict):
    """Report a library-level cache hit as Prefect's `Cached` state."""
    if result.get("status") == "cached":
        return Completed(data=result, name="Cached", message=f"cached ({result.get('key', '')})")
    return result


@task(name="ingest", cache_policy=NO_CACHE, retries=0)
def ingest_dataset(config: Config, home: Path, force: bool) -> dict:
    return _finish(stages.ingest(config, home, force=force))


@task(name="validate", cache_policy=NO_CACHE)
def validate_dataset(ingested: dict, config: Config, home: Path, force: bool) -> dict:
    run_id = str(get_run_context().task_run.flow_run_id)
    try:
        result = stages.validate(ingested, config, home, force=force, flow_run_id=run_id)
    except ValidationFailed as failure:  # the report of a failed batch is what people need to see
        _publish_validation_report(failure.report_md, failure.data_docs_page, passed=False)
        raise
    if result["status"] != "cached":
        _publish_validation_report(result.pop("report_md"), result.get("data_docs_page"), passed=True)
    return _finish(result)


def _publish_validation_report(report_md: str, data_docs_page: str | None, passed: bool) -> None:
    verdict = "passed" if passed else "FAILED"
    create_markdown_artifact(key="couplet-validation-report", markdown=report_md, description=f"Data-quality report ({verdict})")
    if data_docs_page:
        create_link_artifact(key="couplet-data-docs", link=data_docs_page, link_text="Great Expectations Data Docs")


@task(name="build", cache_policy=NO_CACHE)
def build_dataset(validated: dict, config: Config, home: Path, force: bool) -> dict:
    result = stages.build(validated, config, home, force=force)
    if result["status"] != "cached":
        create_table_artifact(
            key="couplet-dataset-splits",
            table=[{"split": s, "pairs": n, "lengths": str(result["lengths"][s])} for s, n in result["counts"].items()],
            description=f"Dataset {result['dataset_version']}: vocabulary {result['vocab_size']} characters",
        )
    return _finish(result)


@task(name="train", cache_policy=NO_CACHE)
def train_model(built: dict, config: Config, home: Path, force: bool) -> dict:
    return _finish(stages.train(built, config, home, force=force))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(trained: dict, built: dict, config: Config, home: Path, force: bool) -> dict:
    result = stages.evaluate(trained, built, config, home, force=force)
    if result["status"] != "cached":
        metrics = result["metrics"]
        create_table_artifact(
            key="couplet-test-metrics",
            table=[{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float))],
            description=f"Test metrics of {result['run_id']}",
        )
        create_table_artifact(key="couplet-samples", table=result["samples"], description="Probe lines and random test couplets")
    return _finish(result)


def _call(stage_task, *args) -> dict:
    """Run a task and return its manifest (also when it ended in the `Cached` state); errors propagate."""
    return stage_task(*args, return_state=True).result()


def _run_stages(config: Config, home: Path, until: Stage, force: Stage | None, promote: bool) -> dict:
    order = list(stages.STAGES)
    forced = set(order[order.index(force):]) if force else set()
    logger = get_run_logger()
    results: dict[str, dict] = {}
    started = time.perf_counter()

    results["ingest"] = _call(ingest_dataset, config, home, "ingest" in forced)
    if until != "ingest":
        results["validate"] = _call(validate_dataset, results["ingest"], config, home, "validate" in forced)
    if until not in ("ingest", "validate"):
        results["build"] = _call(build_dataset, results["validate"], config, home, "build" in forced)
    if until in ("train", "evaluate"):
        results["train"] = _call(train_model, results["build"], config, home, "train" in forced)
    if until == "evaluate":
        results["evaluate"] = _call(evaluate_model, results["train"], results["build"], config, home, "evaluate" in forced)
        if promote:
            results["promote"] = _call(promote_model, results["evaluate"]["model"], results["evaluate"]["metrics"], config.promote.metric, home)
    summary = stages.summarize(results, seconds=time.perf_counter() - started)
    logger.info("pipeline summary: %s", {k: v["status"] for k, v in summary["stages"].items()})
    return summary


@flow(name="couplet-pipeline", log_prints=True)
def couplet_pipeline(
    source: str | None = None,
    until: Stage = "build",
    overrides: list[str] | None = None,
    config_path: str | None = None,
    force: Stage | None = None,
    promote: bool = True,
) -> dict:
    """Ingest → validate → build (→ train → evaluate) the couplet dataset.

    Args:
        source: dataset URL, .tar.gz or directory (default: the config's `data.source`).
        until: last stage to run.
        overrides: `section.key=value` strings, as in `couplet run --set`.
        config_path: YAML config file.
        force: re-run this stage and every stage after it even if cached.
        promote: after evaluate, make the model champion if it beats the current one.
    """
    config = load_config(config_path, overrides)
    if promote:
        registry.check_metric(config.promote.metric)  # fail now, not after hours of training
    if source:
        config = stages.with_source(config, source)
    return _run_stages(config, couplet_home(), until, force, promote)


if __name__ == "__main__":
    couplet_pipeline()
