"""`couplet serve`: its worker and thread counts, real server processes (loading once, loopback, signals, no
leftover workers) and its one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from modelkit import UPPER
from procs import descendants as _descendants
from servers import CLI, free_port

ROOT = Path(__file__).resolve().parents[1]


def test_default_workers_follow_the_usable_cores(monkeypatch):
    """One worker per core the process may use (its affinity mask), capped; threads share out the rest."""
    from couplet.cli import serve as serve_cli

    cap = serve_cli.MAX_DEFAULT_WORKERS
    assert [serve_cli.default_workers(n) for n in (1, 2, 3, cap, cap + 1, 64)] == [1, 2, 3, cap, cap, cap]
    # --workers 1 keeps one torch thread whatever the machine; N workers never ask for more threads than cores
    assert [serve_cli.default_threads(1, n) for n in (1, 2, 16)] == [1, 1, 1]
    assert [serve_cli.default_threads(w, n) for w, n in ((2, 2), (3, 2), (8, 16), (8, 20), (4, 64))] == [1, 1, 2, 2, 16]
    for workers, cores in ((2, 2), (8, 16), (8, 20), (5, 64), (16, 4)):
        assert workers * serve_cli.default_threads(workers, cores) <= max(cores, workers)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)  # 2 of the machine's cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert serve_cli.usable_cores() == 2 and serve_cli.default_workers() == 2
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert serve_cli.usable_cores() == 64 and serve_cli.default_workers() == cap
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert serve_cli.usable_cores() == 1


@pytest.mark.parametrize("cores, args, workers, threads", [
    (4, [], 4, 1),                      # the default: one process per usable core
    (16, [], 8, 2),                     # capped, the spare cores become torch threads
    (4, ["--workers", "1"], 1, 1),      # in this process, as before
    (4, ["--workers", "3", "--threads", "2"], 3, 2),
])
def test_cli_serve_default_worker_count(tiny_model_dir, monkeypatch, cores, args, workers, threads):
    """What `couplet serve` hands uvicorn, without starting a server (uvicorn.run is replaced)."""
    import torch
    import uvicorn
    from typer.testing import CliRunner

    from couplet.cli import COMMAND_MODULES, app
    from couplet.cli import serve as serve_cli

    for name in COMMAND_MODULES:
        __import__(name)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: calls.append((target, kw)))
    monkeypatch.setattr(serve_cli, "usable_cores", lambda: cores)
    for name in ("COUPLET_SERVE_MODEL", "COUPLET_SERVE_DEVICE", "COUPLET_SERVE_BATCHING", "COUPLET_SERVE_THREADS", "COUPLET_SERVE_BALANCE"):
        monkeypatch.setenv(name, "unset")  # restored (removed) after the test, whatever serve writes
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), *args])
    finally:
        torch.set_num_threads(before)
    assert r.exit_code == 0, r.output
    assert f"with {workers} worker{'s' if workers > 1 else ''} ({threads} torch thread" in r.stderr, r.stderr
    (target, kw), = calls
    if workers == 1:
        assert not isinstance(target, str) and "workers" not in kw  # the app itself: one process, model loaded here
    else:
        assert target == "couplet.serving.app:app_from_env" and kw["factory"] and kw["workers"] == workers
        assert os.environ["COUPLET_SERVE_MODEL"] == str(tiny_model_dir)
        assert os.environ["COUPLET_SERVE_THREADS"] == str(threads)
        assert os.environ["COUPLET_SERVE_BATCHING"] == "1"
        assert os.environ["COUPLET_SERVE_BALANCE"].endswith("slots")  # the workers' shared slot file (removed by now)


@pytest.mark.slow
@pytest.mark.parametrize("workers, stop", [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_cli_serve_loads_once_and_binds_loopback(tiny_model_dir, tmp_path, workers, stop):
    port = free_port()
    env = {**os.environ, "COUPLET_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--model", str(tiny_model_dir), "--workers", str(workers)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert resp.json()["model"] == tiny_model_dir.name
        resp = httpx.post(f"http://127.0.0.1:{port}/api/match", json={"upper": UPPER, "top_k": 2}, timeout=10)
        assert resp.status_code == 200 and len(resp.json()["candidates"]) >= 1
        with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent requests, spread over the workers
            answers = list(pool.map(lambda _: httpx.post(f"http://127.0.0.1:{port}/api/match", json={"upper": UPPER}, timeout=10), range(16)))
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["candidates"][0]["lower"] for a in answers}) == 1  # every worker loaded the same model
        started = _descendants(proc.pid)
        assert len(started) >= workers - 1, started  # uvicorn's worker processes (the supervisor is `proc`)
    finally:
        os.kill(proc.pid, stop)  # the parent only, as systemd or a container runtime would
        _, err = proc.communicate(timeout=20)
    assert f"127.0.0.1:{port}/ with {workers} worker" in err, err
    assert proc.returncode == 128 + stop, err
    assert err.strip().splitlines()[-1] == f"interrupted: {signal.Signals(stop).name}; the server stopped", err
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists()], "a server worker outlived couplet serve"


def test_cli_serve_errors_are_one_line(tmp_path, tiny_model_dir):
    env = {**os.environ, "COUPLET_HOME": str(tmp_path)}
    r = subprocess.run([*CLI, "serve", "--model", str(tmp_path / "missing")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "missing" in r.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([*CLI, "serve", "--port", str(port), "--model", str(tiny_model_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and str(port) in r.stderr, r.stderr
