"""Stages 2–3 as partitioned tasks: the local runner (threads of the flow) and a Dask cluster give the same outputs.

The integration tests run `couplet run --until build` end to end: once with `--runner local` (checking that
neither dask nor prefect_dask was imported), against an address nobody answers (a one-line error, nothing
written), then the same command on a LocalCluster of 2 worker processes on loopback through `--dask-address`.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from datagen import layout_files, make_pairs, write_tarball

import couplet.data.validate as validate_module
from couplet.data.build import run_build
from couplet.core.config import DataConfig
from couplet.data.ingest import run_ingest
from couplet.data.validate import run_validate

DASK_MODULES = ("dask", "distributed", "prefect_dask")


def _dataset(path: Path) -> Path:
    """Several line lengths, punctuation, duplicates, pairs shared by train and test, and a few rows validation rejects."""
    train = make_pairs(2400, seed=3, lengths=(4, 5, 7, 9), punct_every=4)
    train += train[:150] + [("春风a", "秋雪b"), ("春风", "秋雪草"), ("春风", "春风")] * 5
    test = make_pairs(240, seed=4, lengths=(5, 7)) + train[:20]
    return write_tarball(path, layout_files(train, test))


def _digests(home: Path) -> dict[str, str]:
    """SHA-256 of every file under data/processed, except what names the run (validate's report and manifest)."""
    processed = home / "data" / "processed"
    return {
        str(p.relative_to(processed)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(processed.rglob("*"))
        if p.is_file() and not (p.parts[-3] == "validate" and p.name in ("report.md", "manifest.json"))
    }


def _threads(fn, calls):
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda call: fn(*call), calls))


def test_partitions_do_not_change_the_outputs(tmp_path, monkeypatch):
    """Small chunks run on threads give the files of one chunk run here (the library, no Prefect)."""
    config = DataConfig(source=str(_dataset(tmp_path / "data.tar.gz")))
    homes = {}
    for name, chunk_rows, partitions in (("one", 10**9, None), ("many", 300, _threads)):
        home = homes[name] = tmp_path / name
        home.mkdir()
        monkeypatch.setattr(validate_module, "CHUNK_ROWS", chunk_rows)
        validated = run_validate(run_ingest(config, home), config, home, partitions=partitions)
        assert validated["rejected"] == 15
        built = run_build(validated, config, home, partitions=partitions)
        assert len(built["lengths"]["train"]) == 4
    assert _digests(homes["one"]) == _digests(homes["many"])


def _couplet_run(home: Path, prefect_home: Path, *args: str, probe_modules: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "COUPLET_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    if probe_modules:  # the CLI in-process, then which Dask modules it imported
        code = ("import sys\nfrom couplet.cli import main\nsys.argv = ['couplet', 'run', *sys.argv[1:]]\ntry:\n    main()\n"
                "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
                f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {DASK_MODULES!r})))")
        command = [sys.executable, "-c", "import json\n" + code, *args]
    else:
        command = [sys.executable, "-m", "couplet", "run", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=home)


@pytest.fixture(scope="module")
def dask_cluster():
    """A Dask LocalCluster: 2 single-threaded worker processes on loopback, one for the module (the worker-killing
    plugin a test registers kills only while its switch files exist)."""
    import dask
    from distributed import LocalCluster

    # a partition that kills 2 workers fails (the default, 3, restarts workers 4 times: slower, and tested by nobody here)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        yield cluster


@pytest.mark.integration
def test_dask_runner_gives_the_local_runners_outputs(tmp_path, prefect_home, dask_cluster):
    source = _dataset(tmp_path / "data.tar.gz")
    local_home, dask_home = tmp_path / "local", tmp_path / "dask"
    local_home.mkdir()
    dask_home.mkdir()
    started = time.monotonic()

    local = _couplet_run(local_home, prefect_home, "--source", str(source), "--until", "build", "--json", probe_modules=True)
    assert local.returncode == 0, local.stderr[-3000:]
    *_, summary_line, modules_line = local.stdout.strip().splitlines()
    assert json.loads(modules_line) == [], "the local runner imported Dask"
    local_summary = json.loads(summary_line)
    t_local = time.monotonic() - started

    # a scheduler nobody answers: one line, quickly, before any stage has written anything
    unreachable = _couplet_run(dask_home, prefect_home, "--source", str(source), "--until", "build", "--runner", "dask",
                               "--dask-address", "tcp://127.0.0.1:9")
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:9: ")
    assert not (dask_home / "data").exists()
    t_unreachable = time.monotonic() - started

    # the same command against the LocalCluster completes
    address = dask_cluster.scheduler_address
    dask = _couplet_run(dask_home, prefect_home, "--source", str(source), "--until", "build", "--runner", "dask",
                        "--dask-address", address, "--json")
    assert dask.returncode == 0, dask.stderr[-3000:]
    dask_summary = json.loads(dask.stdout.strip().splitlines()[-1])
    t_dask = time.monotonic() - started

    assert {s["status"] for s in dask_summary["stages"].values()} == {"completed"}
    assert dask_summary["counts"] == local_summary["counts"] and dask_summary["counts"]["rejected"] == 15
    assert Path(dask_summary["build_dir"]).name == Path(local_summary["build_dir"]).name  # the same cache keys
    local_files, dask_files = _digests(local_home), _digests(dask_home)
    assert any(name.startswith("build/") and name.endswith("vocab.json") for name in local_files)
    assert len([name for name in local_files if name.endswith(".parquet") and name.startswith("build/")]) >= 10
    assert dask_files == local_files  # shards, vocabulary, passed/rejects, manifests of ingest and build
    # the GX suite still ran once, on the whole batch: one Data Docs page for the run
    pages = list((dask_home / "reports" / "gx" / "uncommitted" / "data_docs" / "local_site" / "validations").rglob("*.html"))
    assert len(pages) == 1, pages
    assert not [p for p in (dask_home / "data").rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    print(f"timings (s from start): local {t_local:.1f}, unreachable {t_unreachable:.1f}, dask {t_dask:.1f}")


def _kill_worker_plugin(folder: Path):
    """A Dask WorkerPlugin that SIGKILLs its own worker process as a task starts executing, while `folder`
    holds a file `always`, or once (for one worker) when it holds a file `once` - renamed away by the
    worker that claims it. Defined here, so cloudpickle sends it to the workers by value."""
    from distributed import WorkerPlugin

    class KillOnExecute(WorkerPlugin):
        name = "couplet-test-kill-on-execute"

        def transition(self, key, start, finish, **kwargs):
            if finish != "executing":
                return
            if not (folder / "always").exists():
                try:
                    os.rename(folder / "once", folder / f"claimed-{os.getpid()}")
                except OSError:
                    return
            os.kill(os.getpid(), 9)

    return KillOnExecute()


@pytest.mark.integration
def test_a_worker_dying_mid_stage_fails_in_one_line_and_the_rerun_completes(tmp_path, prefect_home, dask_cluster):
    """Workers SIGKILLed while running validate's partitions: once Dask has seen a partition kill its workers
    (allowed-failures + 1 times) the run ends in one line and nothing half-written stays under data/processed;
    the same command then completes even though one more worker dies under it (Dask reruns its partition)."""
    from distributed import Client

    source = _dataset(tmp_path / "data.tar.gz")
    home, switches = tmp_path / "home", tmp_path / "switches"
    home.mkdir()
    switches.mkdir()
    (switches / "always").touch()
    address = dask_cluster.scheduler_address
    with Client(address) as client:
        client.register_plugin(_kill_worker_plugin(switches))
        failed = _couplet_run(home, prefect_home, "--source", str(source), "--until", "build", "--runner", "dask", "--dask-address", address)
        assert failed.returncode == 1, failed.stderr[-3000:]
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("error: validate: partition validate-chunk") and "Dask workers died" in last and "KilledWorker" in last, failed.stderr[-3000:]
        assert "run the same command again" in last
        print("the failure's line:", last)
        processed = home / "data" / "processed"
        assert (processed / "ingest").is_dir()  # ingest runs before the partitions and stays cached
        assert not (processed / "validate").exists() or not list((processed / "validate").rglob("manifest.json"))
        assert not (processed / "build").exists()
        assert not [p for p in processed.rglob("*") if p.name.startswith((".tmp-", ".old-"))]

        (switches / "always").unlink()
        (switches / "once").touch()
        client.wait_for_workers(2, timeout=60)  # the nannies restart the killed workers
        rerun = _couplet_run(home, prefect_home, "--source", str(source), "--until", "build", "--runner", "dask", "--dask-address", address,
                             "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(list(switches.glob("claimed-*"))) == 1  # a worker died under the re-run too, and Dask ran its partition elsewhere
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["stages"]["ingest"]["status"] == "cached"
    assert summary["stages"]["validate"]["status"] == summary["stages"]["build"]["status"] == "completed"
    assert summary["counts"]["rejected"] == 15
    assert not [p for p in (home / "data").rglob("*") if p.name.startswith((".tmp-", ".old-"))]
