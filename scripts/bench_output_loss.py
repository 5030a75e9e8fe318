"""Valid loss at equal steps for model.output=full against model.output=adaptive (issue 20 item 6); one JSON line.

    .venv/bin/python scripts/bench_output_loss.py --build-dir data/processed/build/<key> --steps 2000 --threads 1

Each variant trains from the same seed on the same batches (the trainer's own train_step, Adam, cosine schedule
with warm-up as train.lr_schedule=cosine) and is scored every --eval-every steps on the whole valid split with
the full log-probabilities (`log_probs`; an adaptive layer's are exact), so the two losses mean the same thing.
Variants run one after the other; their wall-clock seconds are reported too, but on a shared machine only the
losses compare.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import yaml

from couplet.core.config import ModelConfig, TrainConfig
from couplet.data.batches import LengthBucketBatches, load_split
from couplet.data.build import read_build_manifest
from couplet.data.vocab import PAD
from couplet.modelling.model import MODEL_KINDS, build_labeller
from couplet.modelling.step import lr_factor, make_optimizer, train_step


@torch.no_grad()
def valid_nll(model, buckets, rows: int = 512) -> float:
    """Mean -log p(target) per non-PAD valid token from the model's full log-probabilities."""
    total, count = 0.0, 0
    for up, down in buckets.values():
        for s in range(0, len(up), rows):
            u, d = torch.from_numpy(up[s : s + rows]), torch.from_numpy(down[s : s + rows])
            lp = model.log_probs(u)  # (B, L, V)
            keep = d != PAD
            total += float(-lp.gather(2, d.unsqueeze(2)).squeeze(2)[keep].sum())
            count += int(keep.sum())
    return total / max(count, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", type=Path, required=True)
    ap.add_argument("--outputs", default="full,adaptive")
    ap.add_argument("--kind", choices=sorted(MODEL_KINDS), default="attention")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra model.KEY=VALUE for the adaptive variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab_size = int(read_build_manifest(args.build_dir)["vocab_size"])
    train, valid = load_split(args.build_dir, "train", 16), load_split(args.build_dir, "valid", 16)
    tc = TrainConfig(lr_schedule="cosine", warmup_steps=args.warmup_steps, max_minutes=None)
    extra = {k: yaml.safe_load(v) for k, v in (item.removeprefix("model.").split("=", 1) for item in args.set)}
    results = []
    for output in args.outputs.split(","):
        torch.manual_seed(0)
        cfg = ModelConfig(kind=args.kind, output=output, **(extra if output == "adaptive" else {}))
        model = build_labeller(vocab_size, cfg)
        optimizer = make_optimizer(model, args.lr)
        batches = iter(LengthBucketBatches(train, args.batch_size, seed=0))
        curve, start, train_s = {}, time.perf_counter(), 0.0
        for step in range(args.steps):
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_factor(tc, step, args.steps, 0.0)
            up, down = next(batches)
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, up, down, torch.autocast("cpu", enabled=False))
            train_s += time.perf_counter() - t0
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                curve[step + 1] = round(valid_nll(model, valid), 4)
                print(json.dumps({"output": output, "step": step + 1, "valid_nll": curve[step + 1],
                                  "train_loss": round(float(loss), 4), "train_s": round(train_s, 1)}), flush=True)
        results.append({"output": output, "config": cfg.model_dump(mode="json"), "valid_nll": curve,
                        "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - start, 1)})
    print(json.dumps({"kind": args.kind, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                      "vocab_size": vocab_size, "data": str(args.build_dir), "load_avg_1m": round(os.getloadavg()[0], 2),
                      "results": results}))


if __name__ == "__main__":
    main()
