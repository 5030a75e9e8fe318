"""End to end: `couplet run` through Prefect (its temporary local server), as a user runs it; with nothing
changed, without Prefect (couplet/cached_run.py)."""

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import snapshot
from datagen import write_dataset_tarball

COUPLET = [sys.executable, "-m", "couplet"]


def couplet_run(home: Path, prefect_home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "COUPLET_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([*COUPLET, "run", *args], env=env, capture_output=True, text=True, timeout=300, cwd=home)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summary_of(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


REUSED = "nothing changed: the outputs of flow run"  # the line of a run that did not start Prefect


def reused_flow_run(proc) -> str | None:
    """The id of the flow run whose outputs a run reused without starting Prefect (None: it went through Prefect)."""
    line = next((line for line in (proc.stdout + proc.stderr).splitlines() if REUSED in line), None)
    return None if line is None else line.split("(")[1].split(",")[0]


def recorded_flow_run(home: Path, stage: str, key: str) -> str:
    return json.loads((home / "runs.json").read_text())[f"{stage}/{key}"]["flow_run_id"]


def without_seconds(summary: dict) -> dict:
    return {**summary, "seconds": None, "stages": {k: v["status"] for k, v in summary["stages"].items()}}


@pytest.fixture
def tarball(tmp_path) -> Path:
    return write_dataset_tarball(tmp_path / "couplet.tar.gz", n_train=300, n_test=30)


@pytest.mark.slow
def test_run_from_file_cached_then_param_change(home, prefect_home, tarball):
    run = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "build", "--json")
    first = summary_of(run)
    assert {k: v["status"] for k, v in first["stages"].items()} == {"ingest": "completed", "validate": "completed", "build": "completed"}
    assert first["counts"]["test"] == 30 and first["counts"]["train"] + first["counts"]["valid"] == 300
    assert first["counts"]["rejected"] == 0
    assert Path(first["report"]).is_file() and first["dataset_version"]
    assert set(first["counts"]) == {"train", "valid", "test", "rejected"}
    assert reused_flow_run(run) is None

    # Nothing changed: answered without Prefect, naming the flow run that made the outputs.
    run = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "build", "--json")
    second = summary_of(run)
    assert {v["status"] for v in second["stages"].values()} == {"cached"}
    assert second["counts"] == first["counts"] and set(second) == set(first)
    assert reused_flow_run(run) == recorded_flow_run(home, "build", Path(first["build_dir"]).name)

    run = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "build", "--set", "data.min_count=1", "--json")
    third = summary_of(run)
    assert {k: v["status"] for k, v in third["stages"].items()} == {"ingest": "cached", "validate": "cached", "build": "completed"}
    assert reused_flow_run(run) is None  # a changed parameter goes through Prefect

    # A damaged output (same size, other bytes) goes through Prefect too, which rebuilds it; then nothing changed again.
    shard = next(Path(third["build_dir"]).glob("train/*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    run = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "build", "--set", "data.min_count=1", "--json")
    assert reused_flow_run(run) is None and summary_of(run)["stages"]["build"]["status"] == "completed"
    run = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "build", "--set", "data.min_count=1", "--json")
    assert reused_flow_run(run) == recorded_flow_run(home, "build", Path(third["build_dir"]).name)
    assert without_seconds(summary_of(run)) == without_seconds({**third, "stages": {k: {"status": "cached"} for k in third["stages"]}})

    run = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "build", "--force", "validate", "--json")
    forced = summary_of(run)
    assert {k: v["status"] for k, v in forced["stages"].items()} == {"ingest": "cached", "validate": "completed", "build": "completed"}
    assert reused_flow_run(run) is None

    report = subprocess.run([*COUPLET, "report"], env={**os.environ, "COUPLET_HOME": str(home)}, capture_output=True, text=True)
    assert report.returncode == 0 and "report.md" in report.stdout


@pytest.mark.slow
def test_run_over_http_and_bad_inputs(home, prefect_home, tarball, tmp_path):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tarball.parent))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{tarball.name}"
        ok = summary_of(couplet_run(home, prefect_home, "--source", url, "--until", "build", "--json"))
        assert ok["stages"]["build"]["status"] == "completed"
        before = snapshot(home / "data" / "processed")

        missing = couplet_run(home, prefect_home, "--source", url + ".nope", "--json", check=False)
        assert missing.returncode != 0
        assert json.loads(missing.stdout.strip().splitlines()[-1])["error"].startswith("download failed: HTTP 404")
        assert missing.stderr.strip().splitlines()[-1].startswith("error: download failed: HTTP 404")
        assert "--source PATH" in missing.stderr and "SOURCE=PATH ./run.sh" in missing.stderr  # how to use a local copy
    finally:
        server.shutdown()
        server.server_close()

    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(tarball.read_bytes()[:200])
    corrupt = couplet_run(home, prefect_home, "--source", str(bad), check=False)
    assert corrupt.returncode != 0 and "corrupt or truncated" in corrupt.stderr.strip().splitlines()[-1]
    assert snapshot(home / "data" / "processed") == before


def test_config_errors_are_one_line(home, prefect_home, tarball):
    proc = couplet_run(home, prefect_home, "--source", str(tarball), "--set", "train.max_stepz=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key train.max_stepz (known: " + proc.stderr.split("(known: ")[1].strip()
    proc = couplet_run(home, prefect_home, "--source", str(tarball), "--set", "train.max_steps=lots", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: train.max_steps: expected an integer, got 'lots'"


@pytest.mark.slow
def test_run_until_evaluate_then_match(home, prefect_home, tarball):
    small = ["--set", "train.max_steps=40", "--set", "model.embed_dim=32", "--set", "model.n_blocks=2",
             "--set", "train.num_threads=1", "--set", "evaluate.n_samples=3", "--set", "train.checkpoint_every=20"]
    first = summary_of(couplet_run(home, prefect_home, "--source", str(tarball), "--until", "evaluate", *small, "--json"))
    assert [k for k in first["stages"]] == ["ingest", "validate", "build", "train", "evaluate", "promote"]
    model = Path(first["model"])
    for name in ("model.safetensors", "vocab.json", "config.json", "metrics.json", "curve.png", "samples.md"):
        assert (model / name).is_file(), name
    metrics = json.loads((model / "metrics.json").read_text())["test"]
    assert metrics == first["metrics"]
    assert metrics["length_match"] == 1.0 and metrics["copy_rate"] == 0.0
    for key in ("ideograph_accuracy", "char_accuracy", "exact_match", "bleu", "punct_match", "repetition_match", "tone_rate", "boundary_f1"):
        assert key in metrics
    samples = (model / "samples.md").read_text()
    assert "晚风摇树树还挺" in samples and "phrase-table baseline" in samples
    # The generated lower lines are a character-for-character mapping of the upper ones: the phrase-table
    # baseline is perfect there, so this small model cannot beat it and is not promoted automatically.
    baseline = json.loads((model / "metrics.json").read_text())["test_baseline"]
    assert first["baseline"] == baseline and baseline["ideograph_accuracy"] == 1.0
    assert first["beats_baseline"] is False and metrics["beats_baseline"] is False
    assert not first["promotion"]["promoted"] and "phrase-table baseline" in first["promotion"]["reason"]
    assert json.loads((home / "models" / "registry.json").read_text())["champion"] is None

    # A home without the runs record (written before it existed) goes through Prefect, which records the run ...
    (home / "runs.json").unlink()
    run = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "evaluate", *small, "--json")
    through_prefect = summary_of(run)
    assert all(v["status"] == "cached" for v in through_prefect["stages"].values()), through_prefect["stages"]
    assert through_prefect["promotion"]["status"] == "cached" and through_prefect["promotion"]["champion"] is None
    assert reused_flow_run(run) is None
    # ... and from then on nothing changed is answered without Prefect: the same summary, naming that flow run.
    run = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "evaluate", *small, "--json")
    assert without_seconds(summary_of(run)) == without_seconds(through_prefect)
    assert reused_flow_run(run) == recorded_flow_run(home, "evaluate", json.loads((model / "evaluation.json").read_text())["key"])
    assert run.stdout.count("\n") == 1  # stdout: only the JSON line
    human = couplet_run(home, prefect_home, "--source", str(tarball), "--until", "evaluate", *small)
    assert "does not beat the phrase-table baseline" in human.stdout and REUSED in human.stdout.splitlines()[-1]
    assert_checks_each_stage(home, tarball, small)

    env = {**os.environ, "COUPLET_HOME": str(home)}
    match = subprocess.run([sys.executable, "-m", "couplet", "match", "春风花月", "--top-k", "2", "--json"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert match.returncode == 0, match.stderr
    answer = json.loads(match.stdout)
    assert answer["model"] == model.name and len(answer["candidates"]) == 2  # no champion: the newest model
    assert all(len(c["lower"]) == 4 for c in answer["candidates"])
    bad = subprocess.run([sys.executable, "-m", "couplet", "match", "hello"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def assert_checks_each_stage(home: Path, tarball: Path, small: list[str]) -> None:
    """In process: the fully cached home of a run is reused; an edited stage module, a changed parameter, a
    URL source or a promotion not decided before are not."""
    from couplet import registry
    from couplet.cached_run import nothing_changed
    from couplet.core import stage
    from couplet.core.config import load_config
    from couplet.summary import with_source

    config = with_source(load_config(None, small[1::2]), str(tarball))
    summary, flow_run = nothing_changed(config, home, "evaluate", promote=True)
    assert {v["status"] for v in summary["stages"].values()} == {"cached"} and flow_run["flow_run_name"]
    assert nothing_changed(config, home, "build", promote=True) is not None
    assert nothing_changed(with_source(config, "http://127.0.0.1:9/couplet.tar.gz"), home, "build", promote=True) is None
    assert nothing_changed(with_source(load_config(None, [*small[1::2], "decode.beam_size=3"]), str(tarball)), home, "evaluate",
                           promote=True) is None
    code_version = stage.code_version
    try:
        stage.code_version = lambda name, *a: code_version(name, *a) + ("-edited" if name == "train" else "")
        assert nothing_changed(config, home, "build", promote=True) is not None
        assert nothing_changed(config, home, "evaluate", promote=True) is None
    finally:
        stage.code_version = code_version
    with_other_metric = with_source(load_config(None, [*small[1::2], "promote.metric=exact_match"]), str(tarball))
    assert registry.decided_before(summary["model"], summary["metrics"], home, "exact_match") is None
    assert nothing_changed(with_other_metric, home, "evaluate", promote=True) is None
    assert nothing_changed(with_other_metric, home, "evaluate", promote=False) is not None


@pytest.mark.slow
def test_failed_validation_is_one_line_naming_the_rule(home, prefect_home, tmp_path):
    from datagen import layout_files, make_pairs, write_tarball

    misaligned = [(u, d[:-1]) for u, d in make_pairs(40)]
    source = write_tarball(tmp_path / "bad.tar.gz", layout_files(misaligned, make_pairs(5, seed=2)))
    proc = couplet_run(home, prefect_home, "--source", str(source), "--json", check=False)
    assert proc.returncode == 1
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error.startswith("validation failed:") and "equal_length 40" in error
    assert proc.stderr.strip().splitlines()[-1] == f"error: {error}"
    assert not (home / "data" / "processed" / "validate").exists()
    assert not (home / "data" / "processed" / "build").exists()


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(entry.name), cmdline))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_killed_run_leaves_no_server_and_a_rerun_completes(home, prefect_home, tarball):
    import signal
    import time

    env = {**os.environ, "COUPLET_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([*COUPLET, "run", "--source", str(tarball), "--until", "build", "--json"], env=env, cwd=home,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    servers: list[int] = []
    while not servers and time.monotonic() < deadline and run.poll() is None:
        servers = [pid for pid, cmd in _children(run.pid) if "prefect.server.api.server" in cmd]
        time.sleep(0.05)
    assert servers, "couplet run started no temporary Prefect server"
    os.kill(run.pid, signal.SIGKILL)  # atexit does not run: only the parent-death signal can stop the server
    run.wait(timeout=10)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in servers), f"server {servers} outlived its killed couplet run"

    rerun = summary_of(couplet_run(home, prefect_home, "--source", str(tarball), "--until", "build", "--json"))
    assert set(rerun["stages"]) == {"ingest", "validate", "build"}
    assert rerun["counts"]["test"] == 30 and rerun["counts"]["train"] + rerun["counts"]["valid"] == 300
