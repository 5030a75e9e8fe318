"""`couplet serve`: its worker and thread counts, real server processes (loading once, loopback, signals, no
leftover workers) and its one-line errors."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------- `couplet match`'s studio options (issue 18)


def _match(*args: str, input: str | None = None):
    """`couplet match *args` in this process (torch's thread count restored afterwards)."""
    import torch
    from typer.testing import CliRunner

    import couplet.cli.model  # noqa: F401  (registers match)
    from couplet.cli import app

    before = torch.get_num_threads()
    try:
        return CliRunner().invoke(app, ["match", *args], input=input)
    finally:
        torch.set_num_threads(before)


def _one_line_error(r, *needles: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for needle in needles:
        assert needle.lower() in r.stderr.lower(), r.stderr
    return r.stderr


def test_match_plain_output_unchanged(tiny_model_dir, tiny_predictor):
    r = _match(UPPER, "--model", str(tiny_model_dir))
    assert r.exit_code == 0 and r.stdout == tiny_predictor.match(UPPER).best + "\n"
    r = _match(UPPER, "--model", str(tiny_model_dir), "--top-k", "2")
    assert [line.split()[1] for line in r.stdout.splitlines()] == [c.lower for c in tiny_predictor.match(UPPER, top_k=2).candidates]


def test_match_reverse(tiny_model_dir, tiny_predictor, tmp_path):
    r = _match(UPPER, "--model", str(tiny_model_dir), "--reverse", "--json")
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert body["direction"] == "up" and len(body["candidates"][0]["lower"]) == len(UPPER)
    assert body["candidates"][0]["lower"] == tiny_predictor.match(UPPER, direction="up").best
    r = _match("--model", str(tiny_model_dir), "--reverse", "--json", "--file", "-", input="海阔凭鱼跃\nhello\n")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0]["direction"] == "up" and len(lines[0]["candidates"][0]["lower"]) == 5 and "error" in lines[1]

    from modelkit import TINY, save_tiny_model

    from couplet.core.config import Config

    one_way = save_tiny_model(tmp_path / "one-way", Config(model=TINY.model_copy(update={"directions": 1})))
    _one_line_error(_match(UPPER, "--model", str(one_way), "--reverse"), "only upper", "directions=2")
    _one_line_error(_match("--model", str(one_way), "--reverse", "--file", "-", input=UPPER + "\n"), "only upper")


def test_match_pins_and_head(tiny_model_dir, tiny_predictor):
    r = _match(UPPER, "--model", str(tiny_model_dir), "--pin", "0=云", "--pin", "3=雨")
    assert r.exit_code == 0, r.output
    lower = r.stdout.strip()
    assert lower[0] == "云" and lower[3] == "雨" and len(lower) == len(UPPER) and lower == tiny_predictor.match(UPPER, pins={0: "云", 3: "雨"}).best
    r = _match(UPPER, "--model", str(tiny_model_dir), "--head", "云", "--pin", "3=雨", "--json")
    assert json.loads(r.stdout)["candidates"][0]["lower"] == lower
    r = _match(UPPER, "--model", str(tiny_model_dir), "--head", "云", "--pin", "0=云")  # the same pin twice is fine
    assert r.exit_code == 0 and r.stdout.strip()[0] == "云"
    # every line of a file gets the pins
    r = _match("--model", str(tiny_model_dir), "--head", "云", "--file", "-", input="海阔凭鱼跃\n春风得意马蹄疾\n")
    assert [line[0] for line in r.stdout.splitlines()] == ["云", "云"]


@pytest.mark.parametrize("args, needles", [
    (["--pin", "0=云", "--pin", "0=雨"], ["--pin", "two pins at position 0"]),
    (["--pin", "x"], ["--pin 'x'", "POS=CHAR"]),
    (["--pin", "0"], ["--pin '0'", "POS=CHAR"]),
    (["--pin", "a=云"], ["--pin 'a=云'"]),
    (["--pin", "-1=云"], ["--pin '-1=云'"]),
    (["--pin", "0="], ["--pin '0='"]),
    (["--pin", "7=云"], ["pin 7=云", "out of range"]),
    (["--pin", "0=，"], ["pin 0=，", "punctuation"]),
    (["--pin", "0=龘"], ["pin 0=龘", "vocabulary"]),
    (["--pin", "0=云雨"], ["pin 0=云雨", "one character"]),
    (["--head", "云", "--pin", "0=雨"], ["--head 云", "--pin 0=雨", "position 0"]),
    (["--head", "云雨"], ["--head", "one character"]),
    (["--alternatives", "21"], ["--alternatives", "0 to 20", "21"]),
    (["--alternatives", "-1"], ["--alternatives", "-1"]),
])
def test_match_bad_studio_options_are_one_line(tiny_model_dir, args, needles):
    _one_line_error(_match(UPPER, "--model", str(tiny_model_dir), *args), *needles)


def test_match_alternatives(tiny_model_dir, tiny_predictor):
    expected = tiny_predictor.match(UPPER, alternatives=2)
    r = _match(UPPER, "--model", str(tiny_model_dir), "--alternatives", "2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == expected.best and lines[1].startswith("alternatives")
    rows = lines[2:]
    assert len(rows) == len(UPPER)
    for i, (row, others) in enumerate(zip(rows, expected.alternatives)):
        pos, ch, bar, *rest = row.split()
        assert (int(pos), ch, bar) == (i, expected.best[i], "|")
        assert rest[0::2] == [a.char for a in others] and [float(x) for x in rest[1::2]] == pytest.approx([a.score for a in others], abs=0.01)
    r = _match(UPPER, "--model", str(tiny_model_dir), "--alternatives", "2", "--json")
    body = json.loads(r.stdout)
    assert [[a["char"] for a in p] for p in body["alternatives"]] == [[a.char for a in p] for p in expected.alternatives]
    r = _match("--model", str(tiny_model_dir), "--alternatives", "2", "--json", "--file", "-", input="海阔凭鱼跃\n")
    assert len(json.loads(r.stdout)["alternatives"]) == 5
    _one_line_error(_match("--model", str(tiny_model_dir), "--alternatives", "2", "--file", "-", input="海阔凭鱼跃\n"), "--json")


def test_match_blocklist(tiny_model_dir, tiny_predictor, tmp_path):
    best = tiny_predictor.match(UPPER, top_k=3).candidates
    words = tmp_path / "words.txt"
    words.write_text(f"# my words\n{best[0].lower[:2]}\n水花\n", encoding="utf-8")
    r = _match(UPPER, "--model", str(tiny_model_dir), "--blocklist", str(words), "--top-k", "3", "--json")
    assert r.exit_code == 0, r.output
    lowers = [c["lower"] for c in json.loads(r.stdout)["candidates"]]
    assert lowers and all(best[0].lower[:2] not in lower for lower in lowers)
    _one_line_error(_match("山水花草", "--model", str(tiny_model_dir), "--blocklist", str(words)), "blocked word", "水花")

    empty, not_utf8, folder = tmp_path / "empty.txt", tmp_path / "latin1.txt", tmp_path / "folder"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    not_utf8.write_bytes("春风".encode("gb18030"))
    folder.mkdir()
    for path, needle in ((tmp_path / "missing.txt", "not found"), (empty, "no words"), (not_utf8, "utf-8"), (folder, "directory")):
        _one_line_error(_match(UPPER, "--model", str(tiny_model_dir), "--blocklist", str(path)), "--blocklist", str(path), needle)


def test_serve_blocklist(tiny_model_dir, tmp_path, monkeypatch):
    """`couplet serve --blocklist`: a bad file is one line before anything starts; a good one reaches every worker."""
    import torch
    import uvicorn
    from typer.testing import CliRunner

    from couplet.cli import COMMAND_MODULES, app

    for name in COMMAND_MODULES:
        __import__(name)
    env = {**os.environ, "COUPLET_HOME": str(tmp_path)}
    r = subprocess.run([*CLI, "serve", "--model", str(tiny_model_dir), "--blocklist", str(tmp_path / "nope.txt")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --blocklist") and r.stderr.count("\n") == 1, r.stderr
    assert "nope.txt" in r.stderr

    words = tmp_path / "words.txt"
    words.write_text("水花\n", encoding="utf-8")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: calls.append((target, kw)))
    for name in ("COUPLET_SERVE_MODEL", "COUPLET_SERVE_DEVICE", "COUPLET_SERVE_BATCHING", "COUPLET_SERVE_THREADS", "COUPLET_SERVE_BALANCE", "COUPLET_SERVE_BLOCKLIST"):
        monkeypatch.setenv(name, "unset")
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), "--workers", "2", "--no-balance", "--blocklist", str(words)])
        assert r.exit_code == 0, r.output
        assert os.environ["COUPLET_SERVE_BLOCKLIST"] == str(words.resolve())
        from couplet.serving.app import app_from_env

        served = app_from_env()  # what each worker builds
        assert "水花" in served.state.answerer.predictor.blocklist.words
        r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--port", str(free_port()), "--workers", "1", "--blocklist", str(words)])
        assert r.exit_code == 0, r.output
        assert "水花" in calls[-1][0].state.answerer.predictor.blocklist.words
    finally:
        torch.set_num_threads(before)
