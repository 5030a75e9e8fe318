"""The couplet pipeline as Prefect flows. Only orchestration lives here; every stage is a plain
function `run_<stage>` in `couplet/<stage>.py` that caches by content through `couplet.stage` and
returns a small manifest.

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

from couplet import registry
from couplet.build import run_build
from couplet.catalog import STAGES
from couplet.config import Config, couplet_home, load_config
from couplet.ingest import run_ingest
from couplet.pipeline import summarize, with_source
from couplet.validate import ValidationFailed, run_validate
from flows.promote import promote_model

Stage = Literal[STAGES]


def _finish(result: dict):
    """Report a library-level cache hit as Prefect's `Cached` state."""
    if result.get("status") == "cached":
        return Completed(data=result, name="Cached", message=f"cached ({result.get('key', '')})")
    return result


@task(name="ingest", cache_policy=NO_CACHE, retries=0)
def ingest_dataset(config: Config, home: Path, force: bool) -> dict:
    return _finish(run_ingest(config.data, home, force=force))


@task(name="validate", cache_policy=NO_CACHE)
def validate_dataset(ingested: dict, config: Config, home: Path, force: bool) -> dict:
    run_id = str(get_run_context().task_run.flow_run_id)
    try:
        result = run_validate(ingested, config.data, home, force=force, flow_run_id=run_id)
    except ValidationFailed as failure:  # the report of a failed batch is what people need to see
        _publish_validation_report(failure.report_md, failure.data_docs_page, passed=False)
        raise
    if result["status"] != "cached":
        report_md = Path(result["report_path"]).read_text(encoding="utf-8")
        _publish_validation_report(report_md, result.get("data_docs_page"), passed=True)
    return _finish(result)


def _publish_validation_report(report_md: str, data_docs_page: str | None, passed: bool) -> None:
    verdict = "passed" if passed else "FAILED"
    create_markdown_artifact(key="couplet-validation-report", markdown=report_md, description=f"Data-quality report ({verdict})")
    if data_docs_page:
        create_link_artifact(key="couplet-data-docs", link=data_docs_page, link_text="Great Expectations Data Docs")


@task(name="build", cache_policy=NO_CACHE)
def build_dataset(validated: dict, config: Config, home: Path, force: bool) -> dict:
    result = run_build(validated, config.data, home, force=force)
    if result["status"] != "cached":
        create_table_artifact(
            key="couplet-dataset-splits",
            table=[{"split": s, "pairs": n, "lengths": str(result["lengths"][s])} for s, n in result["counts"].items()],
            description=f"Dataset {result['dataset_version']}: vocabulary {result['vocab_size']} characters",
        )
    return _finish(result)


@task(name="train", cache_policy=NO_CACHE)
def train_model(built: dict, config: Config, home: Path, force: bool) -> dict:
    from couplet.train import run_train  # torch is imported only by runs that train (~1 s, ~170 MB)

    return _finish(run_train(built, config, home, force=force))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(trained: dict, built: dict, config: Config, home: Path, force: bool) -> dict:
    from couplet.evaluate import run_evaluate  # imports torch, like train

    result = run_evaluate(trained, built, config, home, force=force)
    if result["status"] != "cached":
        metrics = result["metrics"]
        create_table_artifact(
            key="couplet-test-metrics",
            table=[{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float))],
            description=f"Test metrics of {result['run_id']}",
        )
        create_table_artifact(key="couplet-samples", table=result["samples"], description="Probe lines and random test couplets")
    return _finish(result)


# Each stage's task and the earlier results it takes, in the order of STAGES.
STAGE_TASKS = {
    "ingest": (ingest_dataset, ()),
    "validate": (validate_dataset, ("ingest",)),
    "build": (build_dataset, ("validate",)),
    "train": (train_model, ("build",)),
    "evaluate": (evaluate_model, ("train", "build")),
}


def _run_stages(config: Config, home: Path, until: Stage, force: Stage | None, promote: bool) -> dict:
    """Run the stages up to `until` (re-running `force` and every later one), then promote."""
    started = time.perf_counter()
    results: dict[str, dict] = {}
    for index, name in enumerate(STAGES[: STAGES.index(until) + 1]):
        stage_task, needs = STAGE_TASKS[name]
        forced = force is not None and index >= STAGES.index(force)
        # return_state: a stage that ended in `Cached` still hands on its manifest; errors propagate
        results[name] = stage_task(*(results[n] for n in needs), config, home, forced, return_state=True).result()
    if until == "evaluate" and promote:
        evaluated = results["evaluate"]
        results["promote"] = promote_model(
            evaluated["model"], evaluated["metrics"], config.promote.metric, home, baseline_metrics=evaluated.get("baseline_metrics"),
            require_baseline=config.promote.require_baseline, return_state=True,
        ).result()
    summary = summarize(results, seconds=time.perf_counter() - started)
    get_run_logger().info("pipeline summary: %s", {k: v["status"] for k, v in summary["stages"].items()})
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
        config = with_source(config, source)
    return _run_stages(config, couplet_home(), until, force, promote)


if __name__ == "__main__":
    couplet_pipeline()
