"""The couplet pipeline as Prefect flows. Only orchestration lives here; every stage is a plain
function `run_<stage>` in its module (`couplet.core.catalog.STAGE_MODULES`) that caches by content through `couplet.core.stage` and
returns a small manifest.

A stage whose output already exists for its cache key ends in a Completed state named `Cached`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, get_run_context
from prefect.states import Completed
from prefect.transactions import BaseTransaction

from couplet import registry
from couplet.cached_run import record_flow_run
from couplet.data.build import run_build
from couplet.core.catalog import STAGES
from couplet.core.config import Config, couplet_home, load_config
from couplet.data.ingest import run_ingest
from couplet.summary import summarize, with_source
from couplet.data.validate import ValidationFailed, run_validate
from flows.promote import promote_model

Stage = Literal[STAGES]
Runner = Literal["local", "dask"]
RUNNERS = ("local", "dask")
DASK_CONNECT_TIMEOUT_S = 5  # an existing scheduler that does not answer within this fails the run before anything is written
DASK_WORKERS_TIMEOUT_S = 30  # ... and one without a single worker after this


class DaskUnreachable(RuntimeError):
    """The Dask scheduler given by --dask-address did not answer (or has no workers); one line."""


class PartitionLost(RuntimeError):
    """A partition the Dask cluster could not run to the end (its workers died, or the scheduler went away); one line."""


# ----------------------------------------------------------------------------------------- partitions
#
# Validate and build hand their partitions (row chunks; line lengths) to a `partitions(fn, calls)`
# callable. Here each call becomes a Prefect task run submitted to a task runner: the flow's own
# ThreadPoolTaskRunner (runner "local": this process) or a DaskTaskRunner opened for stages 2-3
# (runner "dask"). Partitions get their data as arguments and return results, and only the stage,
# in this process, writes files - into its temporary folder, renamed into place when all is written
# (couplet.core.stage.run_cached) - so a worker needs no shared filesystem, and a failed or late
# partition cannot leave a file behind. Task runs are named `<stage>-<partition>`, under their stage.


# The task runner of the running data stages (None: the flow's own). A context variable, not a task
# parameter: a parameter would travel with every partition's serialised context, and a Dask client does not.
_partition_runner: contextvars.ContextVar[Callable[[], Any]] = contextvars.ContextVar("couplet_partition_runner", default=lambda: None)


@functools.lru_cache(maxsize=None)
def _partition_task(fn: Callable[..., Any]):
    return task(fn, name=fn.__name__.replace("_", "-"), cache_policy=NO_CACHE, persist_result=False, retries=0)


def _partition_run_name(stage: str, fn: Callable[..., Any], index: int, call: tuple) -> str:
    if stage == "build":  # the second argument of each build partition: its hash bucket, batch or line length
        return f"build-{fn.__name__.split('_')[0]}{call[1]:03d}"
    return f"{stage}-chunk{index:03d}"


def _partitions_on(stage: str) -> Callable[[Callable[..., Any], list[tuple]], list[Any]]:
    """`partitions(fn, calls)` for couplet.data.validate / couplet.data.build: one task run per call on the data
    stages' task runner (`data_task_runner`), results in call order; the first failure raises."""

    submitted = itertools.count()  # the stages hand over their partitions a window at a time: number them across windows

    def partitions(fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
        runner = _partition_runner.get()() or FlowRunContext.get().task_runner
        names = list(inspect.signature(fn).parameters)
        # Submitted outside the stage task's transaction: a task run's transaction is kept, with its result, in its
        # parent's `children` until the parent ends, which would hold every partition's data for the whole stage.
        outside = BaseTransaction.__var__.set(None)
        try:
            run_names = [_partition_run_name(stage, fn, next(submitted), call) for call in calls]
            futures = [runner.submit(_partition_task(fn).with_options(task_run_name=run_name), dict(zip(names, call)))
                       for run_name, call in zip(run_names, calls)]
        finally:
            BaseTransaction.__var__.reset(outside)
        return [_partition_result(stage, run_name, future) for run_name, future in zip(run_names, futures)]

    return partitions


def _partition_result(stage: str, run_name: str, future) -> Any:
    """The partition's result; a failure of the Dask cluster itself (not of the partition's code) as one line."""
    try:
        return future.result()
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "distributed":  # the partition's own error, already one line
            raise
        if type(exc).__name__ == "KilledWorker":
            tries = getattr(exc, "allowed_failures", None)
            last = getattr(getattr(exc, "last_worker", None), "address", None)
            why = (f"the Dask workers died while running it (KilledWorker: {tries + 1 if isinstance(tries, int) else 'several'} workers"
                   f"{', the last ' + last if last else ''})")
        elif type(exc).__name__ == "FutureCancelledError":  # the client lost its scheduler (or someone cancelled it)
            why = "the Dask cluster lost it: its scheduler went away or cancelled it"
        else:
            why = f"the Dask cluster lost it ({type(exc).__name__}: {' '.join(str(exc).split())[:200] or '-'})"
        raise PartitionLost(f"{stage}: partition {run_name} did not finish: {why}; nothing of {stage} was written - "
                            "run the same command again (finished stages stay cached)") from None


def _started_dask_runner(stack: contextlib.ExitStack, dask_address: str | None):
    """A DaskTaskRunner entered on `stack` and connected: to `dask_address`, or to a new LocalCluster."""
    import dask
    from prefect_dask import DaskTaskRunner

    # Partitions carry their rows as arguments, so each task's graph is megabytes by design (it passes through
    # the scheduler to a worker): no "Sending large graph" warning on the console for every partition.
    stack.enter_context(dask.config.set({"distributed.admin.large-graph-warning-threshold": "4GiB"}))
    if dask_address:
        task_runner = DaskTaskRunner(address=dask_address, client_kwargs={"timeout": f"{DASK_CONNECT_TIMEOUT_S}s"})
    else:  # one single-threaded worker process per core, on loopback, no dashboard
        task_runner = DaskTaskRunner(cluster_kwargs={"threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
                                                     "dashboard_address": None})
    stack.enter_context(task_runner)
    try:
        client = task_runner.client  # connects (or starts the LocalCluster) now
    except Exception as exc:  # noqa: BLE001 - OSError/TimeoutError from distributed, ValueError for a bad address
        where = dask_address or "a temporary LocalCluster"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DaskUnreachable(f"cannot reach the Dask scheduler at {where}: {reason}") from None
    if dask_address:
        try:
            client.wait_for_workers(1, timeout=DASK_WORKERS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - TimeoutError
            raise DaskUnreachable(f"the Dask scheduler at {dask_address} has no workers (waited {DASK_WORKERS_TIMEOUT_S} s); "
                                  "start some with: dask worker " + dask_address) from None
    get_run_logger().info("data stages partitioned on Dask: %s", client)
    return task_runner


@contextlib.contextmanager
def data_task_runner(runner: Runner, dask_address: str | None) -> Iterator[Callable[[], Any]]:
    """How the data stages' partitions find their task runner: a function returning None (the flow's own)
    for "local"; for "dask" a started DaskTaskRunner, connected to `dask_address` or on a LocalCluster,
    closed on leaving.

    An address is connected to at once, so an unreachable scheduler fails the run before any stage has
    written anything; a LocalCluster starts when the first partition needs it (a cached run starts none).
    """
    if runner == "local":
        yield lambda: None  # today's path: dask and prefect_dask are never imported
        return
    with contextlib.ExitStack() as stack:
        if dask_address:
            started = _started_dask_runner(stack, dask_address)
            yield lambda: started
        else:
            yield functools.cache(lambda: _started_dask_runner(stack, None))


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
        result = run_validate(ingested, config.data, home, force=force, flow_run_id=run_id,
                              partitions=_partitions_on("validate"))
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
    result = run_build(validated, config.data, home, force=force, partitions=_partitions_on("build"))
    if result["status"] != "cached":
        create_table_artifact(
            key="couplet-dataset-splits",
            table=[{"split": s, "pairs": n, "lengths": str(result["lengths"][s])} for s, n in result["counts"].items()],
            description=f"Dataset {result['dataset_version']}: vocabulary {result['vocab_size']} characters",
        )
    return _finish(result)


@task(name="train", cache_policy=NO_CACHE)
def train_model(built: dict, config: Config, home: Path, force: bool) -> dict:
    from couplet.modelling.train import run_train  # torch is imported only by runs that train (~1 s, ~170 MB)

    return _finish(run_train(built, config, home, force=force))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(trained: dict, built: dict, config: Config, home: Path, force: bool) -> dict:
    from couplet.evaluation.evaluate import run_evaluate  # imports torch, like train

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


PARTITIONED = ("validate", "build")  # the stages whose partitions run on the chosen task runner


def _run_stages(config: Config, home: Path, until: Stage, force: Stage | None, promote: bool,
                runner: Runner = "local", dask_address: str | None = None) -> dict:
    """Run the stages up to `until` (re-running `force` and every later one), then promote."""
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with contextlib.ExitStack() as data_stages:
        token = _partition_runner.set(data_stages.enter_context(data_task_runner(runner, dask_address)))
        data_stages.callback(_partition_runner.reset, token)
        for index, name in enumerate(STAGES[: STAGES.index(until) + 1]):
            if index > STAGES.index(PARTITIONED[-1]):
                data_stages.close()  # a temporary Dask cluster is not kept through training
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
    flow_run = FlowRunContext.get().flow_run
    record_flow_run(home, results, str(flow_run.id), flow_run.name)  # what `couplet run` names when nothing changed
    return summary


@flow(name="couplet-pipeline", log_prints=True)
def couplet_pipeline(
    source: str | None = None,
    until: Stage = "build",
    overrides: list[str] | None = None,
    config_path: str | None = None,
    force: Stage | None = None,
    promote: bool = True,
    runner: Runner = "local",
    dask_address: str | None = None,
) -> dict:
    """Ingest → validate → build (→ train → evaluate) the couplet dataset.

    Args:
        source: dataset URL, .tar.gz or directory (default: the config's `data.source`).
        until: last stage to run.
        overrides: `section.key=value` strings, as in `couplet run --set`.
        config_path: YAML config file.
        force: re-run this stage and every stage after it even if cached.
        promote: after evaluate, make the model champion if it beats the current one.
        runner: where the partitions of validate and build run: "local" (threads of this process) or
            "dask" (a Dask cluster; same outputs).
        dask_address: with runner "dask", the scheduler to use (e.g. tcp://10.0.0.5:8786); none: a
            temporary LocalCluster on this machine.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, not {runner!r}")
    if dask_address and runner != "dask":
        raise ValueError("a Dask address is for runner 'dask' (--runner dask --dask-address ...)")
    config = load_config(config_path, overrides)
    if promote:
        registry.check_metric(config.promote.metric)  # fail now, not after hours of training
    if source:
        config = with_source(config, source)
    return _run_stages(config, couplet_home(), until, force, promote, runner, dask_address)


if __name__ == "__main__":
    couplet_pipeline()
