"""train.nproc > 1: torchrun + DistributedDataParallel (couplet/modelling/distributed.py).

The 2-process runs use gloo on CPU and the tiny model of tests/test_train.py; each costs ~10 s on 2 cores, most
of it starting torchrun and its workers. Tolerances, for the same config and global batch as one process:
- dropout off, fp32 (train.cpu_bf16=false): best validation loss within 1e-3 (relative) and every saved weight
  within 1e-4 (absolute) — the gradients are the same up to float summation order;
- dropout on (each rank draws its own masks): best validation loss within 0.01 (absolute) of one process's once
  both have trained (48 steps).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from couplet.modelling.checkpoint import run_fingerprint
from couplet.core.config import ConfigError, apply_overrides, replace
from couplet.modelling.distributed import DistributedTrainingError, Ranks, failure_line
from couplet.modelling.train import train_labeller
from shardkit import make_build_dir
from test_train import PAIRS, VALID, small_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def build(tmp_path):
    return make_build_dir(tmp_path, PAIRS, valid_pairs=VALID, test_pairs=VALID)


def with_nproc(config, nproc: int):
    return replace(config, "train", nproc=nproc)


# --------------------------------------------------------------------------- fast: config, errors, the one-process path


def test_nproc_defaults_to_one_and_is_not_part_of_the_checkpoint_fingerprint():
    config = small_config()
    assert config.train.nproc == 1
    assert apply_overrides(config, ["train.nproc=4"]).train.nproc == 4
    with pytest.raises(ConfigError, match=r"^train\.nproc"):
        apply_overrides(config, ["train.nproc=0"])
    # a checkpoint holds the global batch position only: a run resumes it with any number of processes
    assert run_fingerprint(with_nproc(config, 2), 10, "k") == run_fingerprint(config, 10, "k")


def test_batch_size_must_split_evenly_over_the_processes(build, tmp_path):
    with pytest.raises(ValueError, match=r"train\.batch_size=4 cannot be split over train\.nproc=3"):
        train_labeller(build, with_nproc(small_config(max_steps=4), 3), tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "checkpoints").exists()


def test_a_rank_takes_its_rows_of_every_column_the_direction_too():
    ranks = object.__new__(Ranks)  # no process group: shard reads only rank and world
    ranks.rank, ranks.world = 1, 2
    up, down, direction = torch.arange(8).view(4, 2), torch.arange(8, 16).view(4, 2), torch.tensor([0, 1, 1, 0])
    u, d, k = ranks.shard(up, down, direction)  # a batch with swapped pairs
    assert (u.tolist(), d.tolist(), k.tolist()) == ([[4, 5], [6, 7]], [[12, 13], [14, 15]], [1, 0])
    assert [t.tolist() for t in ranks.shard(up, down)] == [[[4, 5], [6, 7]], [[12, 13], [14, 15]]]


def test_failure_line_names_the_killed_rank_first():
    def failure(local_rank, exitcode, timestamp, message=""):
        name = signal.Signals(-exitcode).name if exitcode < 0 else "<N/A>"
        return SimpleNamespace(local_rank=local_rank, pid=100 + local_rank, exitcode=exitcode, timestamp=timestamp,
                               message=message, signal_name=lambda: name)

    killed = SimpleNamespace(failures={0: failure(0, 1, 50, {"message": "RuntimeError: Connection reset\n by peer"}),
                                       1: failure(1, -9, 50), 2: failure(0, -15, 51)})
    line = failure_line(killed)
    assert "\n" not in line
    assert line.startswith("multi-process training failed: rank 1 (local rank 1, pid 101) was killed by SIGKILL (rank 0 exit 1, "
                           "rank 2 ended by SIGTERM)")
    assert line.endswith("run again to resume from the last checkpoint")
    errored = SimpleNamespace(failures={3: failure(1, 1, 40, {"message": "ValueError: bad shard"}), 0: failure(0, -15, 41)})
    assert "rank 3 (local rank 1, pid 101) exited with code 1: ValueError: bad shard (rank 0 ended by SIGTERM)" in failure_line(errored)


def test_a_repeated_signal_in_a_worker_is_the_same_stop_request_not_an_abort(monkeypatch):
    # the agent forwards SIGTERM and its death sends the parent-death signal too: a worker sees two within
    # milliseconds, and raising at the second would cut it off mid-collective and lose rank 0's checkpoint
    installed = {}
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.__setitem__(signum, handler))
    ranks = Ranks.__new__(Ranks)  # no process group: only the signal flag is exercised
    ranks.interrupted = 0
    ranks.listen_for_signals()  # the handlers are called directly: no real signal reaches this test process
    assert set(installed) == {signal.SIGINT, signal.SIGTERM}
    for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
        installed[signum](signum, None)  # never raises
    assert ranks.interrupted == signal.SIGTERM  # the first one is the one the workers exit with (128 + it)


def test_peer_lost_reads_gloo_and_nccl_errors_only():
    assert Ranks.peer_lost(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:54426. This is typically"))
    assert not Ranks.peer_lost(RuntimeError("CUDA out of memory"))
    assert not Ranks.peer_lost(KeyboardInterrupt("Connection closed by peer"))


def test_one_process_never_loads_couplet_distributed_nor_a_process_group(build, tmp_path):
    code = (
        "import sys, json; sys.path.insert(0, 'tests')\n"
        "import torch.distributed as dist\n"
        "from test_train import small_config\n"
        "from couplet.modelling.train import train_labeller\n"
        f"s = train_labeller({str(build)!r}, small_config(max_steps=3), {str(tmp_path / 'm')!r}, progress=False)\n"
        "print(json.dumps(['couplet.modelling.distributed' in sys.modules, dist.is_initialized(), s['steps']]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [False, False, 3]
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["processes"] == 1


def test_the_stage_the_worker_and_the_loop_import_one_way():
    # the nproc dispatch (the train stage) sits above both the torchrun worker and the loop it runs: no cycle,
    # and the stage's code version covers all three
    from couplet.core.stage import module_closure

    assert "couplet.modelling.distributed" not in module_closure("couplet.modelling.loop")
    assert "couplet.modelling.train" not in module_closure("couplet.modelling.distributed")
    assert {"couplet.modelling.loop", "couplet.modelling.distributed"} <= set(module_closure("couplet.modelling.train"))


# --------------------------------------------------------------------------- slow: real torchrun runs (gloo, CPU)


@pytest.mark.integration
def test_two_processes_match_one_process_with_the_same_global_batch(build, tmp_path):
    # the defaults stay on: cosine schedule, EMA of the weights (what is validated and saved), a time budget
    # The gated CNN: in the attention kind the key bias gets no gradient but rounding noise, which Adam scales up
    # into steps that differ between one and two processes (the valid loss still agrees; the weights would not).
    # fp32 on every CPU: with native bf16 (train.cpu_bf16=auto turns autocast on) the two runs round their matmuls
    # differently and part by ~1% in valid loss after 24 steps, which is bf16's noise, not a DDP fault.
    config = replace(small_config(max_steps=24, eval_every=8, patience=100, warmup_steps=4, cpu_bf16=False),
                     "model", kind="gated_cnn", dropout=0.0)
    one = train_labeller(build, config, tmp_path / "one", progress=False)
    two = train_labeller(build, with_nproc(config, 2), tmp_path / "two", progress=False)
    assert two["steps"] == one["steps"] == 24 and two["device"] == "cpu"
    assert two["best_valid_loss"] == pytest.approx(one["best_valid_loss"], rel=1e-3)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4)
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert [p[0] for p in m2["history"] if p[2] is not None] == [p[0] for p in m1["history"] if p[2] is not None] == [8, 16, 24]
    # rank 0 alone wrote the model folder; the checkpoint is the one a single process writes, at step 20
    last = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert last["progress"]["step"] == 20 and last["data"]["batch_size"] == 4
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["last.pt"]
    assert "final" in (tmp_path / "two" / "samples.md").read_text()


@pytest.mark.integration
def test_two_processes_with_dropout_reach_one_process_valid_loss(build, tmp_path):
    # model.dropout 0.25: the masks differ, so the runs agree at the end, not step by step (after 24 steps the
    # loss still spreads 0.08-0.28 over one-process seeds; after 48 every run was below 0.001 without word tags;
    # with them (the default) 48 left the two runs 0.012 apart, 64 agree)
    config = small_config(max_steps=64, eval_every=8, patience=100, warmup_steps=4)
    one = train_labeller(build, config, tmp_path / "one", progress=False)
    two = train_labeller(build, with_nproc(config, 2), tmp_path / "two", progress=False)
    assert abs(two["best_valid_loss"] - one["best_valid_loss"]) < 0.01


def _pid_of(tag: str, rank: int) -> int | None:
    """The worker of rank `rank` started by this test (found by the tag in its environment)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path("/proc", entry, "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"COUPLET_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
                return int(entry)
    return None


@pytest.mark.integration
def test_a_killed_rank_fails_the_run_in_one_line_and_a_rerun_resumes(build, tmp_path, monkeypatch):
    tag = uuid.uuid4().hex
    monkeypatch.setenv("COUPLET_TEST_TAG", tag)
    config = with_nproc(small_config(max_steps=100_000, lr_schedule="constant"), 2)  # would run for hours
    ckpt = tmp_path / "m" / "checkpoints" / "last.pt"
    killed = []

    def kill_rank_1_after_a_checkpoint():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pid = _pid_of(tag, 1) if ckpt.is_file() else None
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)

    threading.Thread(target=kill_rank_1_after_a_checkpoint, daemon=True).start()
    with pytest.raises(DistributedTrainingError) as failed:
        train_labeller(build, config, tmp_path / "m", progress=False)
    message = str(failed.value)
    assert killed and "\n" not in message
    assert message.startswith(f"multi-process training failed: rank 1 (local rank 1, pid {killed[0]}) was killed by SIGKILL")
    # rank 0 saw its peer vanish mid-collective and wrote a last checkpoint: at or past the periodic one (every 5)
    step = torch.load(ckpt, weights_only=True)["progress"]["step"]
    assert step >= 5
    # the same config (a shorter run, which a checkpoint allows) resumes from it, with 2 processes again
    summary = train_labeller(build, replace(config, "train", max_steps=step + 4), tmp_path / "m", progress=False)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert summary["resumed_from"] == metrics["resumed_from"] == step > 0 and metrics["steps"] == step + 4
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.integration
def test_an_interrupt_stops_every_rank_and_rank_0_writes_the_last_checkpoint(build, tmp_path):
    # Ctrl-C in the process that called train_labeller: a process of its own, whose SIGINT handler the test sets
    config = replace(with_nproc(small_config(max_steps=100_000, lr_schedule="constant"), 2), "train", checkpoint_every=10_000,
                     swapped_pairs=False)  # 4 steps an epoch
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    caller = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys; from pathlib import Path; from couplet.core.config import load_config; "
         # as an interactive caller has it: a suite started as a background job (`./test.sh &`) inherits SIGINT ignored
         "signal.signal(signal.SIGINT, signal.default_int_handler); "
         "from couplet.modelling.train import train_labeller; "
         "train_labeller(Path(sys.argv[1]), load_config(sys.argv[2]), Path(sys.argv[3]), progress=False)",
         str(build), str(tmp_path / "config.json"), str(tmp_path / "m")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, deadline = tmp_path / "m" / "samples.md", time.monotonic() + 240  # generous: a loaded CI machine is slow
    trained = lambda: samples.is_file() and samples.read_text().count("epoch") >= 2  # noqa: E731
    try:
        while time.monotonic() < deadline and not trained() and caller.poll() is None:
            time.sleep(0.1)
        assert trained(), "the ranks never trained two epochs"
        caller.send_signal(signal.SIGINT)
        _, err = caller.communicate(timeout=60)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    assert caller.returncode == -signal.SIGINT and "KeyboardInterrupt" in err, err[-3000:]  # raised through to the top
    # no periodic checkpoint was due (every 10,000 steps): this one is the interrupt's, written at a sync point
    # (every 10 steps and every epoch end: 4 steps here)
    step = torch.load(tmp_path / "m" / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"]
    assert step >= 8 and (step % 10 == 0 or step % 4 == 0)
    summary = train_labeller(build, replace(config, "train", max_steps=step + 2), tmp_path / "m", progress=False)
    assert summary["resumed_from"] == step


@pytest.mark.integration
def test_workers_stop_and_checkpoint_when_the_launcher_is_killed(build, tmp_path):
    # kill -9 of the launcher (torchrun's agent): its workers get SIGTERM (parent-death signal) and stop together
    config = replace(with_nproc(small_config(max_steps=100_000, lr_schedule="constant"), 2), "train", checkpoint_every=10_000)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    tag = uuid.uuid4().hex
    launcher = subprocess.Popen(
        [sys.executable, "-m", "couplet.modelling.distributed", "launch", "--nproc-per-node", "2", "--standalone", "--",
         "--build-dir", str(build), "--model-dir", str(tmp_path / "m"), "--config", str(tmp_path / "config.json"), "--no-progress"],
        cwd=ROOT, env={**os.environ, "COUPLET_TEST_TAG": tag, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples, deadline = tmp_path / "m" / "samples.md", time.monotonic() + 240  # generous: a loaded CI machine is slow
    trained = lambda: samples.is_file() and samples.read_text().count("epoch") >= 2  # noqa: E731
    try:
        while time.monotonic() < deadline and not trained():
            time.sleep(0.1)
    finally:
        launcher.kill()
        launcher.wait()
    assert trained(), "the ranks never trained two epochs before the launcher was killed"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (_pid_of(tag, 0) or _pid_of(tag, 1)):
        time.sleep(0.1)
    assert not _pid_of(tag, 0) and not _pid_of(tag, 1), "workers outlived their launcher"
    assert (tmp_path / "m" / "checkpoints" / "last.pt").is_file()  # rank 0's last checkpoint, on the signal


def test_cuda_with_more_processes_than_gpus_fails_in_one_line_before_starting(build, tmp_path, monkeypatch):
    # each CUDA rank takes the GPU of its LOCAL_RANK and NCCL cannot put two ranks on one GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = replace(with_nproc(small_config(max_steps=4), 2), "train", device="cuda")
    with pytest.raises(ValueError) as info:
        train_labeller(build, config, tmp_path / "m", progress=False)
    assert str(info.value) == ("train.nproc=2 processes per node need one GPU each, but this machine has 1: "
                               "use train.nproc<=1, or train.device=cpu for gloo")
    assert not (tmp_path / "m").exists()
    auto = replace(config, "train", device="auto")  # auto picks CUDA when it is there
    with pytest.raises(ValueError, match=r"^train\.nproc=2 processes per node need one GPU each"):
        train_labeller(build, auto, tmp_path / "m", progress=False)
