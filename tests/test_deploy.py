"""Operate the pipeline as its users do (docs/operate.md): a real `prefect server start`, the
`couplet-local` process pool, `prefect deploy --all` from prefect.yaml, a worker, and
`prefect deployment run 'couplet-pipeline/train'` on a tiny generated dataset.

Checks: the first run completes, publishes its artifacts and makes its model champion; the same
run again ends with every task `Cached` and the champion unchanged; a run with worse settings
(fewer training steps) is evaluated and kept but not promoted.

Every process the test starts carries a marker in its environment; the fixture's finalizer stops
all of them (the server, the worker and any flow-run process the worker spawned in its own
session), also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from datagen import write_dataset_tarball

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds its processes through /proc (Linux)"),
]

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
MARKER = "COUPLET_TEST_DEPLOY"
# The generated data is a character-for-character mapping, which the dictionary baseline answers
# perfectly: lift the baseline rule so these tiny models can be promoted at all.
SMALL = ["model.embed_dim=32", "model.n_blocks=1", "evaluate.n_samples=2", "train.num_threads=1", "promote.require_baseline=false"]
CHAMPION_SETTINGS = ["train.max_steps=30", *SMALL]
WORSE_SETTINGS = ["train.max_steps=2", "evaluate.tune_decode=false", *SMALL]  # far fewer steps, no phrase memory: weaker
TASKS = ["ingest", "validate", "build", "train", "evaluate", "promote"]
# a run that trains long enough to be killed mid-way (checkpoints every 20 steps), then ends by its time budget
KILLED_SETTINGS = ["train.max_minutes=0.25", "train.epochs=100000", "train.checkpoint_every=20", *SMALL]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _marked_pids(token: str) -> list[int]:
    """Every process whose environment holds MARKER=token (ours and whatever they spawned)."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop_all(token: str, procs: list[subprocess.Popen]) -> None:
    """Stop the processes we started, newest first (the worker before the server it reports to),
    then anything else still carrying the marker (flow runs the worker spawned in their own session)."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)  # a worker whose SIGINT is ignored (a `cmd &` of a script) never exits on SIGTERM
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked_pids(token):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while _marked_pids(token) and time.monotonic() < deadline:
            time.sleep(0.1)


class Operator:
    """A shell for one test: environment, background processes, CLI calls, API reads."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.token = uuid.uuid4().hex
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.home = tmp / "couplet-home"
        self.home.mkdir()
        self.procs: list[subprocess.Popen] = []
        keep = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "COUPLET_HOME"}
        self.env = {
            **keep,
            MARKER: self.token,
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "GX_ANALYTICS_ENABLED": "false",
        }

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen([PREFECT, *args], cwd=ROOT, env={**self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def cli(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([PREFECT, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{output[-4000:]}\n" \
                                     f"--- worker log ---\n{self.log_tail('worker')}"
        return output

    def get(self, path: str):
        with urllib.request.urlopen(self.api + path, timeout=10) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.api + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def wait_healthy(self, server: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert server.poll() is None, f"prefect server exited with {server.returncode}:\n{self.log_tail('server')}"
            try:
                if self.get("/health") is True:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"prefect server did not answer within {timeout:.0f} s:\n{self.log_tail('server')}")

    def run_deployment(self, name: str, source: Path, overrides: list[str]) -> dict:
        """`prefect deployment run NAME -p source=... -p overrides=[...] --watch`; the finished flow run."""
        output = self.cli("deployment", "run", name, "-p", f"source={source}", "-p", f"overrides={json.dumps(overrides)}",
                          "--watch", "--watch-timeout", "300", timeout=330)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
        flow_run = self.get(f"/flow_runs/{run_id}")
        assert flow_run["state"]["type"] == "COMPLETED", output[-3000:]
        return flow_run

    def task_states(self, flow_run_id: str) -> dict[str, str]:
        runs = self.post("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})
        return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        found = self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        return {a["key"]: a for a in found if a.get("key")}

    def registry(self) -> dict:
        return json.loads((self.home / "models" / "registry.json").read_text(encoding="utf-8"))


@pytest.fixture
def operator(tmp_path):
    op = Operator(tmp_path)
    try:
        yield op
    finally:
        started = time.monotonic()
        _stop_all(op.token, op.procs)
        print(f"stopped every process in {time.monotonic() - started:.1f} s")
        leftover = _marked_pids(op.token)
        assert not leftover, f"processes still running after the test: {leftover}"


def test_deploy_train_promote_cached_and_worse(operator, tmp_path):
    op = operator
    source = write_dataset_tarball(tmp_path / "drop" / "couplet.tar.gz", n_train=200, n_test=40, seed=0)
    started = time.monotonic()

    # 1. the server, as in docs/operate.md (SQLite under PREFECT_HOME)
    server = op.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(op.port))
    op.wait_healthy(server)
    t_server = time.monotonic() - started

    # 2. the pool and the deployments of prefect.yaml
    op.cli("work-pool", "create", "couplet-local", "--type", "process")
    op.cli("--no-prompt", "deploy", "--all")
    train = op.get("/deployments/name/couplet-pipeline/train")
    validate = op.get("/deployments/name/couplet-pipeline/validate")
    assert train["parameters"]["until"] == "evaluate" and train["parameters"]["promote"] is True
    assert validate["parameters"]["until"] == "build"
    assert train["work_pool_name"] == validate["work_pool_name"] == "couplet-local"
    assert [s["active"] for s in train["schedules"]] == [False]  # weekly, paused until an operator resumes it
    assert train["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    schema = train["parameter_openapi_schema"]["properties"]
    assert schema["source"].get("description") and schema["overrides"].get("description")

    # 3. a worker; it runs the flows with this $COUPLET_HOME
    op.start("worker", "worker", "start", "--pool", "couplet-local",
             env={"COUPLET_HOME": str(op.home), "PREFECT_WORKER_QUERY_SECONDS": "1"})
    t_setup = time.monotonic() - started

    # 4. first run: trains, evaluates, promotes (no champion yet)
    first = op.run_deployment("couplet-pipeline/train", source, CHAMPION_SETTINGS)
    t_first = time.monotonic() - started
    assert op.task_states(first["id"]) == {name: "Completed" for name in TASKS}
    artifacts = op.artifacts(first["id"])
    assert {"couplet-validation-report", "couplet-dataset-splits", "couplet-test-metrics", "couplet-promotion"} <= artifacts.keys()
    assert "**promoted** to champion" in artifacts["couplet-promotion"]["data"]
    registry = op.registry()
    champion = registry["champion"]
    assert champion and (op.home / "models" / champion / "model.safetensors").is_file()
    assert registry["champion_metrics"]["test_fingerprint"]
    assert [r["promoted"] for r in registry["history"]] == [True]

    # 5. the same inputs again: every stage cached, nothing new decided
    again = op.run_deployment("couplet-pipeline/train", source, CHAMPION_SETTINGS)
    t_again = time.monotonic() - started
    assert op.task_states(again["id"]) == {name: "Cached" for name in TASKS}
    assert op.registry() == registry

    # 6. worse settings: a new model, evaluated and kept, not promoted
    worse = op.run_deployment("couplet-pipeline/train", source, WORSE_SETTINGS)
    t_worse = time.monotonic() - started
    states = op.task_states(worse["id"])
    assert states["train"] == states["evaluate"] == states["promote"] == "Completed"
    registry = op.registry()
    last = registry["history"][-1]
    assert registry["champion"] == champion and not last["promoted"] and last["run_id"] != champion
    assert last["challenger_metrics"]["bleu"] < last["champion_metrics"]["bleu"], last
    assert (op.home / "models" / last["run_id"] / "model.safetensors").is_file()
    assert "**not promoted**" in op.artifacts(worse["id"])["couplet-promotion"]["data"]

    # 7. the worker and its flow run killed mid-training (a lost machine): the champion still answers,
    # nothing half-written is visible, and the same run through a new worker resumes and completes
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", op.cli(
        "deployment", "run", "couplet-pipeline/train", "-p", f"source={source}", "-p", f"overrides={json.dumps(KILLED_SETTINGS)}",
    )).group(1)
    known = {p.parent.parent for p in (op.home / "models").glob("*/checkpoints/last.pt")}
    deadline = time.monotonic() + 180
    while not {p.parent.parent for p in (op.home / "models").glob("*/checkpoints/last.pt")} - known:
        assert time.monotonic() < deadline, f"the run never checkpointed:\n{op.log_tail('worker')}"
        time.sleep(0.2)
    server_pid = op.procs[0].pid
    for pid in _marked_pids(op.token):
        if pid != server_pid:
            os.kill(pid, signal.SIGKILL)  # the worker and the flow-run process it spawned
    registry_before = op.registry()
    assert registry_before["champion"] == champion
    env = {**op.env, "COUPLET_HOME": str(op.home)}
    match = subprocess.run([sys.executable, "-m", "couplet", "match", "春风花月", "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert match.returncode == 0 and json.loads(match.stdout)["model"] == champion, match.stderr
    processed = op.home / "data" / "processed"
    assert not [p for p in processed.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert op.get(f"/flow_runs/{flow_run_id}")["state"]["type"] != "COMPLETED"
    # The killed run keeps the deployment's concurrency slot until its lease lapses (about 5 minutes, see
    # docs/operate.md), so the operator's quickest recovery is the same run from the command line:
    rerun = subprocess.run([sys.executable, "-m", "couplet", "run", "--source", str(source), "--until", "evaluate",
                            *[a for setting in KILLED_SETTINGS for a in ("--set", setting)], "--json"],
                           cwd=op.home, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stages = json.loads(rerun.stdout.strip().splitlines()[-1])["stages"]
    assert stages["ingest"]["status"] == stages["build"]["status"] == "cached" and stages["train"]["status"] == "completed"
    trained = [json.loads(p.read_text()) for p in (op.home / "models").glob("*/metrics.json")]
    assert any(t.get("resumed_from") for t in trained), "training did not resume from the killed run's checkpoint"
    t_killed = time.monotonic() - started

    print(f"timings (s from start): server {t_server:.1f}, pool+deploy+worker {t_setup:.1f}, "
          f"first run {t_first:.1f}, cached run {t_again:.1f}, worse run {t_worse:.1f}, killed and resumed {t_killed:.1f}")
