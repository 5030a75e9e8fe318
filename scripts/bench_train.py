"""Training throughput of the couplet labeller, in non-PAD tokens per second; prints one JSON line.

    .venv/bin/python scripts/bench_train.py                      # synthetic: vocab 6000, lengths 5 and 7, batch 64
    .venv/bin/python scripts/bench_train.py --build-dir data/processed/build/<key>
    .venv/bin/python scripts/bench_train.py --threads 2 --loss plain --adam loop   # the variants measured
    .venv/bin/python scripts/bench_train.py --nproc 2          # 1 process, then 2 under torchrun (DDP, gloo)
    .venv/bin/python scripts/bench_train.py --kind attention --threads 1 --output full,adaptive   # A/B, alternating

Runs the trainer's own step (couplet.modelling.step.train_step) on the seed config for --warmup steps, then times
--steps steps, --repeats times, and reports the best and median repeat. The machine may be shared, so
the 1-minute load average is printed too: with 2 threads on 2 busy cores, OpenMP barriers wreck timings.

--output full,adaptive (model.output; with --conv, stock|matmul, the CPU training convolution) builds one model per
variant and times them in turn, repeat by repeat, so a shared machine's load falls on each alike; the JSON then
holds one entry per variant. Each variant starts from the same seed and draws the same batches.

--nproc N measures one process (torch's default threads, or --threads) and then N processes under torchrun,
each a DistributedDataParallel rank taking batch_size / N rows of every global batch (as train.nproc does;
couplet/modelling/distributed.py) with cores / N threads; tokens_per_s there counts the global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from couplet.core.config import ModelConfig
from couplet.data.batches import LengthBucketBatches, load_split
from couplet.data.build import read_build_manifest
from couplet.modelling.model import MODEL_KINDS, CoupletLabeller, build_labeller
from couplet.modelling.step import make_optimizer, train_step
from couplet.data.vocab import PAD


def synthetic_buckets(vocab_size: int, lengths: list[int], rows: int, seed: int = 0):
    """Random couplets with a Zipf-like character distribution, the real dataset's shape."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab_size - 1)
    p /= p.sum()
    draw = lambda n, length: rng.choice(np.arange(2, vocab_size), size=(n, length), p=p).astype(np.int64)  # noqa: E731
    return {length: (draw(rows, length), draw(rows, length)) for length in lengths}


class PlainLoss(torch.nn.Module):
    """The straightforward head: full logits then F.cross_entropy (the baseline to beat)."""

    def __init__(self, model: CoupletLabeller):
        super().__init__()
        self.model = model

    def forward(self, ids, targets):
        x = self.model.features(ids)  # (B, L, d)
        logits = self.model.head(x)  # (B, L, V)
        return None, F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=PAD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", type=Path, help="a build directory (default: synthetic data)")
    ap.add_argument("--vocab-size", type=int, default=6000)
    ap.add_argument("--lengths", default="5,7")
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--loss", choices=["fused", "plain"], default="fused")
    ap.add_argument("--adam", choices=["fused", "foreach", "loop"], default="fused")
    ap.add_argument("--bf16", action="store_true", help="CPU bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kind", choices=sorted(MODEL_KINDS), default="gated_cnn", help="model.kind")
    ap.add_argument("--output", default="full", help="model.output: full, adaptive, or several comma-separated (A/B); "
                    "a variant may add model settings: adaptive+adaptive_div=1+adaptive_cutoffs=[0.2,0.5]")
    ap.add_argument("--conv", default="matmul", help="CPU training convolution: matmul (today's), stock (oneDNN), or both")
    ap.add_argument("--nproc", type=int, default=1, help="also measure this many processes under torchrun (DDP)")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun rank of --nproc
    args = ap.parse_args()
    if args.ddp_worker:
        import torch.distributed as dist

        from couplet.modelling.distributed import Ranks

        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        result = measure(args, Ranks())[0]
        if dist.get_rank() == 0:
            print(json.dumps(result))
        dist.destroy_process_group()
        return
    if args.nproc > 1:
        print(json.dumps(compare_nproc(args)))
        return
    results = measure(args)
    print(json.dumps(results[0] if len(results) == 1 else {"variants": results}))


def compare_nproc(args) -> dict:
    """One process in this one, then args.nproc under torchrun: {"nproc_1": ..., "nproc_N": ..., "ratio": N/1}."""
    import subprocess

    from couplet.modelling.distributed import check_gpus_per_node

    if args.device.startswith("cuda"):
        check_gpus_per_node(args.nproc)  # before the one-process figure, not after it
    single = measure(args)[0]
    argv = list(sys.argv[1:])
    at = argv.index("--nproc")
    del argv[at : at + 2]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           __file__, *argv, "--ddp-worker", "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    multi = json.loads(out.strip().splitlines()[-1])
    return {"nproc_1": single, f"nproc_{args.nproc}": multi,
            "ratio": round(multi["tokens_per_s"] / single["tokens_per_s"], 3), "cores": os.cpu_count()}


@contextlib.contextmanager
def stock_conv(on: bool):
    """With on, the gated blocks convolve through oneDNN in training too (the path before the matmul kernel)."""
    if not on:
        yield
        return
    from couplet.modelling import model as model_module

    saved = model_module.conv1d_same_train
    model_module.conv1d_same_train = lambda x, w, b: F.conv1d(x, w, b, padding="same")
    try:
        yield
    finally:
        model_module.conv1d_same_train = saved


def measure(args, ranks=None) -> list[dict]:
    """One result per --output x --conv variant, timed in turn within each repeat."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.build_dir:
        vocab_size = int(read_build_manifest(args.build_dir)["vocab_size"])
        buckets = load_split(args.build_dir, "train", args.max_len)
    else:
        vocab_size = args.vocab_size
        buckets = synthetic_buckets(vocab_size, [int(x) for x in args.lengths.split(",")], rows=4096)
    batches = LengthBucketBatches(buckets, args.batch_size, seed=0)

    if ranks is not None:
        device = ranks.device_for(device)
        ranks.check_batch(args.batch_size)
    world = 1 if ranks is None else ranks.world
    variants = []
    for output in re.split(r",(?![^\[]*\])", args.output):  # commas inside [...] belong to a setting
        for conv in args.conv.split(","):
            if conv not in ("matmul", "stock"):
                raise SystemExit(f"--conv {conv!r}: matmul or stock")
            if args.loss == "plain" and not output.startswith("full"):
                raise SystemExit("--loss plain is the full output layer's stock loss: use it with --output full")
            torch.manual_seed(0)
            name, *extra = output.split("+")
            cfg = ModelConfig(kind=args.kind, output=name, **{k: yaml.safe_load(v) for k, v in (e.split("=", 1) for e in extra)})
            model = build_labeller(vocab_size, cfg).to(device)
            if args.adam == "fused":
                optimizer = make_optimizer(model, 1e-3)
            else:
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=args.adam == "foreach")
            step_model = PlainLoss(model) if args.loss == "plain" else model
            if ranks is not None:
                step_model = ranks.wrap(step_model)
            if args.compile:
                step_model = torch.compile(step_model)
            variants.append({"output": output, "conv": conv, "model": step_model, "optimizer": optimizer,
                             "stream": batch_stream(LengthBucketBatches(buckets, args.batch_size, seed=0))})
    if args.bf16:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    elif device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()

    def run(v: dict, n: int) -> tuple[int, float, float]:
        if ranks is not None:
            torch.distributed.barrier()  # the ranks start each repeat together
        tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
        with stock_conv(v["conv"] == "stock"):
            for _ in range(n):
                up, down = next(v["stream"])
                if ranks is not None:
                    up, down = ranks.shard(up, down)  # this rank's slice of the global batch
                up, down = up.to(device), down.to(device)
                loss = train_step(v["model"], v["optimizer"], up, down, autocast)
                tokens += int((up != PAD).sum()) * world  # the global batch's tokens
            float(loss)  # sync
        return tokens, time.perf_counter() - t0, time.process_time() - c0

    for v in variants:
        run(v, args.warmup)
    for v in variants:
        v["rates"], v["cpu_rates"] = [], []
    for _ in range(args.repeats):
        for v in variants:  # in turn, so the machine's load falls on every variant alike
            tokens, seconds, cpu_seconds = run(v, args.steps)
            v["rates"].append(tokens / seconds)
            v["cpu_rates"].append(tokens / (cpu_seconds * world))  # DDP: rank 0's CPU time, taken as every rank's
    return [report(args, v["rates"], v["cpu_rates"], v["output"], v["conv"], vocab_size, batches, device, world) for v in variants]


def batch_stream(batches):
    while True:
        yield from batches


def report(args, rates, cpu_rates, output, conv, vocab_size, batches, device, world) -> dict:
    return {
        "kind": args.kind, "output": output, "conv": conv,
        "tokens_per_s": round(max(rates)),
        "tokens_per_s_median": round(statistics.median(rates)),
        "repeats": [round(r) for r in rates],
        # per CPU-second of this process: less sensitive to other processes on a shared machine
        "tokens_per_cpu_s": round(max(cpu_rates)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "steps": args.steps, "batch_size": args.batch_size, "vocab_size": vocab_size,
        "lengths": sorted(batches.buckets), "threads": torch.get_num_threads(),
        "loss": args.loss, "adam": args.adam, "bf16": args.bf16, "compile": args.compile,
        "device": str(device), "torch": torch.__version__, "data": str(args.build_dir or "synthetic"),
        "processes": world,
    }


if __name__ == "__main__":
    main()
