"""Faults an operator meets, on real `couplet run`s: signals mid-run (issue 10).

Each case asserts a clear one-line outcome or a clean recovery, that nothing the run started is left
running, that nothing half-written is visible, and that a re-run completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datagen import write_dataset_tarball
from procs import alive as _alive
from procs import descendants as _descendants

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="walks the process tree through /proc (Linux)"),
]

COUPLET = [sys.executable, "-m", "couplet"]
TINY_TRAIN = ["--set", "model.embed_dim=32", "--set", "model.n_blocks=2", "--set", "train.num_threads=1",
              "--set", "train.batch_size=16", "--set", "train.epochs=100000", "--set", "train.checkpoint_every=100000",
              "--set", "train.eval_every=50"]


@pytest.fixture
def tarball(tmp_path) -> Path:
    return write_dataset_tarball(tmp_path / "couplet.tar.gz", n_train=300, n_test=30)


def _env(home: Path, prefect_home: Path) -> dict:
    env = {**os.environ, "COUPLET_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    return env


def _interrupt(run: subprocess.Popen, signum: int, ready, timeout_s: float = 120) -> tuple[set[int], str]:
    """Wait until `ready()`, note the run's process tree, send `signum`; return the tree and stderr."""
    started: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert run.poll() is None, f"the run ended before the signal: {run.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the run never reached the point to interrupt"
        started |= _descendants(run.pid)
        time.sleep(0.05)
    started |= _descendants(run.pid)
    os.kill(run.pid, signum)
    _, err = run.communicate(timeout=60)
    return started, err


def _assert_nothing_left(started: set[int]) -> None:
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in started if _alive(pid)]
    assert not left, f"processes started by the interrupted run are still running: {left}"


def _run(home, prefect_home, *args) -> dict:
    proc = subprocess.run([*COUPLET, "run", *args, "--json"], env=_env(home, prefect_home), cwd=home,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigterm_mid_train_saves_a_checkpoint_and_the_rerun_resumes(home, prefect_home, trained_home):
    # the shared trained home's data stages, none of its models: the run goes on to train without preparing data
    shutil.copytree(trained_home.home, home, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda folder, names: ["models"] if Path(folder) == trained_home.home else [])
    args = ["--source", str(trained_home.kept_source), "--until", "train", *TINY_TRAIN, "--set", "train.max_minutes=0.25"]
    run = subprocess.Popen([*COUPLET, "run", *args, "--json"], env=_env(home, prefect_home), cwd=home,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    models = home / "models"
    training_for = []

    def training_a_while() -> bool:  # the first validation pass (step 50) is written, then a second of steps
        if not training_for and models.is_dir() and any(models.glob("*/samples.md")):
            training_for.append(time.monotonic())
        return bool(training_for) and time.monotonic() - training_for[0] > 1

    started, err = _interrupt(run, signal.SIGTERM, training_a_while)
    assert run.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: SIGTERM;"), err[-2000:]
    checkpoints = list(models.glob("*/checkpoints/last.pt"))
    assert len(checkpoints) == 1, "training wrote no checkpoint when interrupted"
    assert not list(models.glob("*/train.json")), "an interrupted training must not look finished"
    _assert_nothing_left(started)

    summary = _run(home, prefect_home, *args)
    assert summary["stages"]["train"]["status"] == "completed"
    trained = json.loads(next(models.glob("*/metrics.json")).read_text(encoding="utf-8"))
    assert trained["resumed_from"] and trained["resumed_from"] > 0 and trained["steps"] > trained["resumed_from"]


def test_sigint_mid_data_stages_leaves_nothing_half_written_and_reruns_alike(home, prefect_home, trained_home):
    args = ["--source", str(trained_home.kept_source), "--until", "build"]
    run = subprocess.Popen([*COUPLET, "run", *args, "--json"], env=_env(home, prefect_home), cwd=home,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processed = home / "data" / "processed"
    started, err = _interrupt(run, signal.SIGINT, processed.exists)
    assert run.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: SIGINT;"), err[-2000:]
    _assert_nothing_left(started)
    half_written = [p for p in processed.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert not half_written, half_written

    rerun = _run(home, prefect_home, *args)
    # an undisturbed run of the same data stages on the same file: the shared trained home's
    undisturbed_home, undisturbed = trained_home.home, trained_home.summary
    assert rerun["counts"] == undisturbed["counts"] and rerun["dataset_version"] == undisturbed["dataset_version"]
    build_dir = lambda h: next((h / "data" / "processed" / "build").iterdir())  # noqa: E731
    shards = sorted(p.relative_to(build_dir(home)) for p in build_dir(home).rglob("*.parquet"))
    assert shards == sorted(p.relative_to(build_dir(undisturbed_home)) for p in build_dir(undisturbed_home).rglob("*.parquet"))
    for shard in shards:
        assert (build_dir(home) / shard).read_bytes() == (build_dir(undisturbed_home) / shard).read_bytes()


SMALL_EVAL = ["--set", "train.max_steps=40", "--set", "model.embed_dim=32", "--set", "model.n_blocks=2",
              "--set", "train.num_threads=1", "--set", "evaluate.n_samples=3", "--set", "train.checkpoint_every=20"]

# `couplet run` with every file write under data/processed/build/ failing as on a full disk (the stage writes its
# shards' bytes with Path.write_bytes; Parquet writers are covered too)
DISK_FULL_AT_BUILD = """
import errno, pathlib, sys
import pyarrow.parquet as pq
def full(where):
    if "/data/processed/build/" in str(where):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))
real_write_table, real_write_bytes = pq.write_table, pathlib.Path.write_bytes
def write_table(table, where, *args, **kwargs):
    full(where)
    return real_write_table(table, where, *args, **kwargs)
def write_bytes(self, data):
    full(self)
    return real_write_bytes(self, data)
pq.write_table, pathlib.Path.write_bytes = write_table, write_bytes
sys.argv = ["couplet", *sys.argv[1:]]
from couplet.cli import main
main()
"""


def _match(home: Path) -> dict:
    env = {**os.environ, "COUPLET_HOME": str(home)}
    proc = subprocess.run([*COUPLET, "match", "春风花月", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_disk_full_during_build_is_one_line_and_the_champion_still_answers(home, prefect_home, trained_home):
    shutil.copytree(trained_home.home, home, symlinks=True, dirs_exist_ok=True)  # a home after a run --until evaluate
    tarball = trained_home.kept_source
    run_id = Path(trained_home.summary["model"]).name
    env = _env(home, prefect_home)
    promoted = subprocess.run([*COUPLET, "champion", "set", run_id, "--force"], env=env, capture_output=True, text=True, timeout=60)
    assert promoted.returncode == 0, promoted.stderr
    before = _match(home)
    assert before["model"] == run_id
    processed = home / "data" / "processed"
    builds_before = sorted(p.name for p in (processed / "build").iterdir())

    # another min_count: a new build, whose shard writes find the disk full
    full = subprocess.run([sys.executable, "-c", DISK_FULL_AT_BUILD, "run", "--source", str(tarball), "--until", "evaluate",
                           *SMALL_EVAL, "--set", "data.min_count=1"], env=env, cwd=home, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: build: no space left on the device of ") and last.endswith("free some space and run again"), last
    assert sorted(p.name for p in (processed / "build").iterdir()) == builds_before  # nothing half-written visible
    assert _match(home) == before  # the champion answers as before

    again = _run(home, prefect_home, "--source", str(tarball), "--until", "build", "--set", "data.min_count=1")
    assert again["stages"]["build"]["status"] == "completed"  # space back: the same command completes


def test_two_runs_at_once_on_one_home_agree(home, prefect_home, tarball):
    args = ["--source", str(tarball), "--until", "build", "--json"]
    runs = [subprocess.Popen([*COUPLET, "run", *args], env=_env(home, prefect_home), cwd=home,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-1500:] for _, err in outputs]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert summaries[0]["counts"] == summaries[1]["counts"]
    assert summaries[0]["dataset_version"] == summaries[1]["dataset_version"]
    processed = home / "data" / "processed"
    assert len(list((processed / "build").iterdir())) == 1  # one content-addressed version, no leftovers
    assert not [p for p in processed.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    cached = _run(home, prefect_home, *args[:-1])
    assert {v["status"] for v in cached["stages"].values()} == {"cached"}
