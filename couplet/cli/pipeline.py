"""`couplet run` and `couplet report`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from couplet.core.catalog import STAGES
from couplet.cli import app, fail
from couplet.core.config import ConfigError, couplet_home, load_config
from couplet.summary import metrics_line, with_source


def _prefect_defaults(home: Path, verbose: bool) -> None:
    """Keep Prefect's local state with the project unless the user configured Prefect already."""
    home.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = str(home / ".prefect")
    # Full logs go to the Prefect API (the run's log in the UI / `prefect flow-run logs`); the console
    # shows only what this command prints: progress bars, probe lines, the summary or a one-line error.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "couplet")  # the library's notices reach the run's log too
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@app.command()
def run(
    source: Optional[str] = typer.Option(None, "--source", help="Dataset URL, .tar.gz or directory (default: data.source)."),
    until: str = typer.Option("build", "--until", help=f"Last stage: {', '.join(STAGES)}."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set train.max_steps=300 (repeatable)."),
    force: Optional[str] = typer.Option(None, "--force", help="Re-run this stage and every later one even if cached."),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="After evaluate, make the model champion if it beats the current one."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary line at the end."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Prefect's own log lines on the console."),
    runner: str = typer.Option("local", "--runner", help="Where validate and build run their partitions: local (this process) or dask."),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", help="With --runner dask: the scheduler, e.g. tcp://host:8786 "
                                               "(default: a temporary LocalCluster on this machine)."),
) -> None:
    """Run the pipeline locally through Prefect (its temporary local server; nothing to start)."""
    if until not in STAGES:
        fail(f"--until must be one of {', '.join(STAGES)}, not {until!r}")
    if force is not None and force not in STAGES:
        fail(f"--force must be one of {', '.join(STAGES)}, not {force!r}")
    if runner not in ("local", "dask") or (dask_address and runner != "dask"):
        fail(f"--runner must be local or dask, not {runner!r}" if runner not in ("local", "dask") else "--dask-address needs --runner dask")
    try:
        settings = load_config(config, set_)  # fail fast on bad keys, before Prefect starts
    except ConfigError as exc:
        fail(str(exc))
    home = couplet_home()
    _prefect_defaults(home, verbose)
    _stop_on_signals()
    try:
        if force is None and dask_address is None:  # a scheduler given is connected to first, even when all is cached
            from couplet.cached_run import nothing_changed

            reused = nothing_changed(with_source(settings, source) if source else settings, home, until, promote)
            if reused is not None:
                _print_summary(*reused, as_json=as_json)
                return
        from flows.local_server import start_temporary_server

        wait_until_ready = start_temporary_server()
        from flows.pipeline import couplet_pipeline

        wait_until_ready()
        state = couplet_pipeline(
            source=source, until=until, overrides=list(set_), config_path=str(config) if config else None, force=force, promote=promote,
            runner=runner, dask_address=dask_address, return_state=True
        )
    except BaseException as exc:  # noqa: BLE001 — KeyboardInterrupt, or Prefect's TerminationSignal for SIGTERM
        signum = _received or getattr(exc, "signal", None) or (signal.SIGINT if isinstance(exc, KeyboardInterrupt) else None)
        if signum is None:
            raise
        _leave_interrupted(signum)
    if _received:
        _leave_interrupted(_received)
    _report(state, as_json)


# How long an interrupted run may take to record its state (Prefect marks the flow run crashed, training
# writes its last checkpoint) before it leaves anyway: the API may be gone too (a whole cgroup signalled).
INTERRUPT_GRACE_S = 10.0
_received: int | None = None


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM stop the run at once with a one-line message and exit 128 + the signal.

    While a flow runs, Prefect's own SIGTERM handler raises `TerminationSignal` first and calls this
    handler after recording the crash; training catches either to write a last checkpoint (couplet/modelling/train.py).
    """

    def on_signal(signum: int, frame) -> None:
        global _received
        if _received is not None:  # a second signal: leave now
            _leave_interrupted(signum)
        _received = signum
        watchdog = threading.Timer(INTERRUPT_GRACE_S, _leave_interrupted, args=(signum,))
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)


def _leave_interrupted(signum: int) -> None:
    """Stop what this run started, print one line, exit 130 (SIGINT) or 143 (SIGTERM); atexit is skipped
    (Prefect's exit hooks would wait on an API that may be gone)."""
    from flows.local_server import stop_temporary_server

    with contextlib.suppress(Exception):
        stop_temporary_server()
    _stop_children()
    name = signal.Signals(signum).name
    sys.stdout.flush()
    sys.stderr.write(f"interrupted: {name}; finished stages stay cached and training resumes from its last checkpoint "
                     "- run the same command again\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _stop_children(grace_s: float = 3.0) -> None:
    """SIGTERM every live child process of this one (DataLoader workers and the like), then SIGKILL the stragglers."""
    import time

    def children() -> list[int]:
        found = []
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    with contextlib.suppress(OSError, IndexError, ValueError):
                        fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                        if int(fields[1]) == os.getpid() and fields[0] != "Z":
                            found.append(int(entry.name))
        return found

    pids = children()
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [pid for pid in pids if pid in children()]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _report(state, as_json: bool) -> None:
    if not state.is_completed():
        message = state.message or state.name
        try:
            state.result()
        except Exception as exc:  # the stage's own one-line error
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if as_json:
            print(json.dumps({"status": "failed", "error": message}, ensure_ascii=False))
        fail(message, code=1)
    _print_summary(state.result(), as_json=as_json)


def _print_summary(summary: dict, reused: dict | None = None, *, as_json: bool) -> None:
    """The run's summary; `reused`: the flow run recorded for the outputs of a run with nothing to do."""
    reused_line = (f"run     nothing changed: the outputs of flow run {reused['flow_run_name']} ({reused['flow_run_id']}, "
                   f"finished {reused['finished']}); Prefect not started") if reused else None
    if as_json:
        if reused_line:
            typer.echo(reused_line, err=True)  # stdout keeps its one JSON line
        print(json.dumps(summary, ensure_ascii=False))
        return
    for name, stage in summary["stages"].items():
        typer.echo(f"{name:<9} {stage['status']:<10} {stage['seconds']:>8.2f} s")
    typer.echo(f"dataset {summary.get('dataset_version')}  counts {summary.get('counts')}")
    if summary.get("report"):
        typer.echo(f"report  {summary['report']}")
    if summary.get("model"):
        typer.echo(f"model   {summary['model']}")
    line = metrics_line(summary)  # flags a model that does not beat the dictionary baseline
    if line:
        typer.echo(line)
    if reused_line:
        typer.echo(reused_line)


@app.command()
def report(
    run_id: Optional[str] = typer.Option(None, "--run", help="Validation run id, flow-run id or key (prefix)."),
    as_json: bool = typer.Option(False, "--json", help="Print the index entry as JSON."),
) -> None:
    """Print where the latest (or a given run's) data-quality report is."""
    from couplet.core.catalog import REPORT_FILES, Catalog
    from couplet.data.validate import latest_report

    entry = latest_report(couplet_home(), run_id)
    if entry is None:
        fail(f"no validation report found{' for run ' + run_id if run_id else ''} under {Catalog(couplet_home()).reports_dir}", code=1)
    if as_json:
        print(json.dumps(entry, ensure_ascii=False))
        return
    typer.echo(f"report     {Path(entry['report_dir']) / REPORT_FILES.report}")
    typer.echo(f"data docs  {entry.get('data_docs_page') or '-'}")
    typer.echo(f"run        {entry['run_id']}  {'passed' if entry['success'] else 'FAILED'}  dataset {entry['dataset_version']}")
