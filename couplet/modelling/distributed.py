"""Multi-process training (train.nproc > 1): torchrun and DistributedDataParallel around couplet.modelling.loop.

How a run goes. `train.train_labeller` with train.nproc = N > 1 calls `launch_training`, which starts

    python -m couplet.modelling.distributed launch --nproc-per-node N --standalone -- --build-dir B --model-dir M --config C

as a subprocess and waits for it. That launcher is torchrun (`torch.distributed.run`, same options) whose
workers run `python -m couplet.modelling.distributed worker ...`: each joins the process group (gloo on CPU, NCCL on
CUDA, one GPU per local rank) and runs the training loop, `loop.train_in_process(..., place=Ranks())`: `Ranks`
is the loop's `Place` over the process group (loop.OneProcess is the one-process one). Rank 0 writes everything
(checkpoints, model.safetensors, metrics.json, samples.md) and hands its summary back through a file. The
single-process path (nproc 1) never imports this module nor starts a process group.

Semantics (what "the same run on N processes" means):
- Every rank walks the same `LengthBucketBatches` (same seed, same epoch plan), so the global batch order is
  the one-process order. Each global batch of train.batch_size couplets (one length, never padded) is cut
  into N equal slices, rank r taking rows [r*B/N, (r+1)*B/N); DDP averages the gradients, so a step's
  gradient is the one-process gradient of the same batch up to float summation order. train.batch_size must
  be a multiple of the world size. Dropout masks differ (each rank draws its own), so with dropout on the
  trajectory is statistically, not bitwise, the one-process one; with model.dropout=0 the weights match to
  float rounding (tests/test_distributed.py states the tolerances).
- Validation, early stopping, the time budget (train.max_minutes, on rank 0's clock; the cosine schedule
  reads that same clock) and interrupts are decided at sync points, every SYNC_EVERY steps, at every
  validation step and at every epoch end: one all-reduce carries rank 0's decisions to every rank, so all
  stop at the same step.
- The checkpoint holds the global batch position and no per-rank state, so a run resumes from it with any
  number of processes (nproc is not part of the checkpoint's fingerprint, like num_threads). Rank 0 reads it
  and broadcasts it, so other nodes need no shared file system for it (they do need the build directory).
- SIGINT/SIGTERM in a worker only sets a flag; at the next sync point every rank stops, rank 0 writes a last
  checkpoint and the workers exit 128 + the signal. Repeats only re-set the flag: one stop request often
  arrives twice (the agent forwards it and its death sends the parent-death signal), and cutting a rank off
  mid-collective would cost the checkpoint; the agent's own SIGKILL deadline is the escalation.
- A rank that dies fails the run: the launcher turns torchrun's ChildFailedError into one line naming the
  rank (`DistributedTrainingError`); running again resumes. Rank 0, seeing a peer vanish mid-collective,
  still writes its last checkpoint: a collective fails before the optimizer step, so its state is whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from couplet.core.config import Config, load_config
from couplet.modelling.step import pick_device

log = logging.getLogger("couplet.modelling.train")
SYNC_EVERY = 10  # steps between the ranks' agreements on stopping (and on the clock the schedule reads)
# what gloo and NCCL say in a rank whose peer died mid-collective
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")
INTERRUPT_WAIT_S = 8.0  # how long an interrupted parent waits for the launcher's last checkpoint (the CLI allows 10 s)


class DistributedTrainingError(RuntimeError):
    """A multi-process training run failed; the message is one line naming the failing rank."""


class Ranks:
    """This process's place in the process group and the few collectives the training loop needs (a loop.Place)."""

    def __init__(self, sync_every: int = SYNC_EVERY):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.sync_every = sync_every
        self.interrupted = 0  # the signal received (0: none); acted on at the next sync point
        self.seconds = 0.0  # rank 0's time in train steps at the last sync point: the clock every rank reads
        self.comm_device = torch.device("cpu")

    def device_for(self, device: torch.device) -> torch.device:
        """The device of this rank: its own GPU (LOCAL_RANK) on CUDA, the CPU otherwise."""
        if device.type == "cuda":
            check_gpus_per_node(int(os.environ.get("LOCAL_WORLD_SIZE", self.local_rank + 1)))
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            self.comm_device = device  # NCCL collectives take CUDA tensors
        return device

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(f"train.batch_size={batch_size} cannot be split over {self.world} processes: "
                             "make it a multiple of the world size")

    def shard(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's slice of a global batch, (up, down) or (up, down, direction): rows [rank * B/N, (rank + 1) * B/N)
        of each."""
        part = batch[0].shape[0] // self.world
        rows = slice(self.rank * part, (self.rank + 1) * part)
        return tuple(t[rows] for t in batch)

    def seed_dropout(self, seed: int, step: int) -> None:
        """Ranks other than 0 draw their own dropout masks (rank 0 keeps the one-process RNG stream)."""
        if self.rank:
            torch.manual_seed(seed + 1_000_003 * self.rank + step)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.comm_device.index] if self.comm_device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)  # the labellers have no buffers to sync

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (the checkpoint: read once, no shared file system needed)."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.comm_device if self.comm_device.type == "cuda" else None)
        return box[0]

    def agree(self, state, out_of_time: bool, seconds: float) -> bool:
        """A sync point: rank 0's early-stopping and budget decisions and clock reach every rank, and a signal
        received by any rank stops them all (KeyboardInterrupt: rank 0 then writes the last checkpoint).

        Sets state.stopped_early and self.seconds; returns out_of_time."""
        mine = [float(state.stopped_early), float(out_of_time), seconds] if self.is_main else [0.0, 0.0, 0.0]
        flags = torch.tensor([*mine, float(self.interrupted)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stopped, late, self.seconds, interrupted = flags.tolist()
        state.stopped_early = bool(stopped)
        if interrupted:
            self.interrupted = self.interrupted or int(interrupted)
            raise KeyboardInterrupt(f"signal {signal.Signals(int(interrupted)).name} on a rank")
        return bool(late)

    @staticmethod
    def peer_lost(exc: BaseException) -> bool:
        """Whether `exc` is a collective failing because another rank is gone."""
        return isinstance(exc, RuntimeError) and any(s in str(exc) for s in PEER_LOST)

    def listen_for_signals(self) -> None:
        """SIGINT/SIGTERM set a flag, acted on at the next sync point (a collective must not be cut in half)."""

        def on_signal(signum: int, frame) -> None:
            self.interrupted = self.interrupted or signum

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)


# --------------------------------------------------------------------------- the parent: start torchrun, wait


def check_gpus_per_node(nproc_per_node: int) -> None:
    """Each CUDA rank owns the GPU of its LOCAL_RANK, and NCCL cannot run two ranks on one GPU: fail in one line
    before anything starts rather than with an NCCL error from inside the ranks."""
    gpus = torch.cuda.device_count()
    if nproc_per_node > gpus:
        raise ValueError(f"train.nproc={nproc_per_node} processes per node need one GPU each, but this machine has "
                         f"{gpus}: use train.nproc<={gpus}, or train.device=cpu for gloo")


def launch_training(build_dir: Path, config: Config, model_dir: Path, *, progress: bool = True) -> dict:
    """Train with train.nproc processes on this machine (torchrun --standalone); returns rank 0's summary.

    Raises DistributedTrainingError (one line, naming the rank) when a rank fails. An interrupt of the caller
    (KeyboardInterrupt, Prefect's TerminationSignal) is passed on to the launcher as SIGTERM, whose workers
    stop together and write a last checkpoint; the caller waits up to INTERRUPT_WAIT_S for that."""
    nproc = config.train.nproc
    if config.train.batch_size % nproc:
        raise ValueError(f"train.batch_size={config.train.batch_size} cannot be split over train.nproc={nproc} "
                         "processes: make it a multiple of nproc")
    if pick_device(config.train.device).type == "cuda":  # the device each rank will pick
        check_gpus_per_node(nproc)
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="couplet-ddp-") as tmp:
        config_path, result_path, error_path = Path(tmp, "config.json"), Path(tmp, "result.json"), Path(tmp, "error.txt")
        config_path.write_text(json.dumps(config.to_dict()), encoding="utf-8")
        cmd = [sys.executable, "-m", "couplet.modelling.distributed", "launch", "--error-out", str(error_path),
               "--nproc-per-node", str(nproc), "--standalone", "--",
               "--build-dir", str(build_dir), "--model-dir", str(model_dir), "--config", str(config_path),
               "--result", str(result_path), *([] if progress else ["--no-progress"])]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # `-m couplet...` resolves to this very package
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        threads = config.train.num_threads or max(1, (os.cpu_count() or 1) // nproc)
        env.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun would set 1, with a warning
        proc = subprocess.Popen(cmd, env=env, stdout=2)  # stdout stays clean for the caller's JSON
        try:
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)  # workers stop at their next sync point; rank 0 writes a checkpoint
            try:
                proc.wait(INTERRUPT_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if code != 0:
            reason = error_path.read_text(encoding="utf-8").strip() if error_path.is_file() else ""
            raise DistributedTrainingError(reason or f"multi-process training failed: the launcher exited with code {code}")
        return json.loads(result_path.read_text(encoding="utf-8"))


def failure_line(exc) -> str:
    """torchrun's ChildFailedError as one line naming the rank that failed first (a killed rank before the
    ranks that errored or were stopped because of it)."""

    def order(item):
        rank, f = item
        return (f.timestamp, f.exitcode == -signal.SIGTERM, f.exitcode >= 0, rank)

    def describe(rank: int, f) -> str:
        how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
        message = f.message.get("message", "") if isinstance(f.message, dict) else ""
        detail = f": {' '.join(str(message).split())[:200]}" if message else ""
        return f"rank {rank} (local rank {f.local_rank}, pid {f.pid}) {how}{detail}"

    failures = sorted(exc.failures.items(), key=order)
    rank, first = failures[0]
    others = ", ".join(f"rank {r} {f'ended by {f.signal_name()}' if f.exitcode < 0 else f'exit {f.exitcode}'}" for r, f in failures[1:])
    return (f"multi-process training failed: {describe(rank, first)}" + (f" ({others})" if others else "")
            + "; run again to resume from the last checkpoint")


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux), as flows/local_server.py does for its server: a
    launcher whose caller was killed, or a worker whose torchrun agent was, stops (rank 0 writing a last
    checkpoint) instead of training on unseen, beside a re-run of the same model folder."""
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the agent's own shutdown still stops the workers in the usual cases
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _launch(argv: list[str]) -> int:
    """`launch [--error-out FILE] [torchrun options] -- [worker options]`: torchrun, failures as one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    ours, worker_args = _split(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--error-out", type=Path)
    mine, torchrun_args = own.parse_known_args(ours)
    _die_with_parent()
    args = get_args_parser().parse_args([*torchrun_args, "-m", "couplet.modelling.distributed", "worker", *worker_args])
    try:
        run(args)
    except ChildFailedError as exc:
        line = failure_line(exc)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    else:
        return 0
    sys.stderr.write(line + "\n")
    if mine.error_out:
        mine.error_out.write_text(line + "\n", encoding="utf-8")
    return 1


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """The arguments before and after the first `--`."""
    at = argv.index("--") if "--" in argv else len(argv)
    return argv[:at], argv[at + 1 :]


# --------------------------------------------------------------------------- each rank


def _worker(argv: list[str]) -> int:
    """`worker --build-dir B --model-dir M [--config FILE] [--set k=v ...]`: one rank of a torchrun job."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from couplet.core.atomic import atomic_write_json
    from couplet.modelling.loop import train_in_process  # here: the launcher (torchrun's agent) trains nothing

    ap = argparse.ArgumentParser(prog="python -m couplet.modelling.distributed worker")
    ap.add_argument("--build-dir", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--config", help="YAML or JSON config file (a model folder's config.json works)")
    ap.add_argument("--set", action="append", default=[], help="section.key=value override (repeatable)")
    ap.add_argument("--result", type=Path, help="rank 0 writes its training summary here (JSON)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    @record  # an exception goes into torchrun's error file, so the launcher's one line can quote it
    def main() -> int:
        config = load_config(args.config, args.set)
        device = pick_device(config.train.device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
        ranks = Ranks()
        ranks.listen_for_signals()
        _die_with_parent()  # after the handler: the agent's death then reads as a SIGTERM to stop on
        logging.basicConfig(level=logging.INFO if ranks.is_main else logging.WARNING,
                            format=f"[rank {ranks.rank}] %(message)s" if not ranks.is_main else "%(message)s")
        try:
            summary = train_in_process(args.build_dir, config, args.model_dir, progress=not args.no_progress, place=ranks)
        except KeyboardInterrupt:
            return 128 + (ranks.interrupted or signal.SIGINT)
        except RuntimeError as exc:
            if not ranks.peer_lost(exc):
                raise
            # another rank died mid-collective: that rank is the story (the launcher names it), not this traceback
            log.error("rank %d stopped: another rank is gone (%s)", ranks.rank, " ".join(str(exc).split())[:160])
            return 1
        if ranks.is_main and args.result:
            atomic_write_json(args.result, summary)
        dist.destroy_process_group()
        return 0

    return main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    if argv[:1] == ["launch"]:
        return _launch(argv[1:])
    sys.stderr.write("usage: python -m couplet.modelling.distributed {launch [torchrun options] -- WORKER-OPTIONS | worker WORKER-OPTIONS}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
