#!/usr/bin/env python
"""Inference latency and throughput of `couplet.predictor.Predictor` on CPU, in process.

    .venv/bin/python scripts/bench_infer.py                       # random-init seed-size model
    .venv/bin/python scripts/bench_infer.py --model models/<run>  # a trained model dir
    .venv/bin/python scripts/bench_infer.py --threads 1 --threads 4

Reports single-line latency (p50/p90/p99 of `Predictor.match`, model call + decoding, and the
decoding alone) and batch throughput (`match_batch`, couplets/s) for each thread count.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench_serve import make_random_model  # the one seed-sized random model of the benchmarks


def _lines(vocab, n: int, length: int, rng: random.Random) -> list[str]:
    from couplet.data.punct import is_punct

    chars = [ch for ch in vocab.itos[2:] if not is_punct(ch)][:3000]  # frequent characters
    out = []
    for _ in range(n):
        line = [rng.choice(chars) for _ in range(length)]
        if length >= 4:  # a repeat, like many real lines
            line[rng.randrange(1, length)] = line[0]
        out.append("".join(line))
    return out


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: a random-init seed-size model)")
    ap.add_argument("--vocab-size", type=int, default=6000)
    ap.add_argument("--length", type=int, default=7, help="upper-line length for the single-line test")
    ap.add_argument("--n", type=int, default=500, help="single-line calls")
    ap.add_argument("--batch-lines", type=int, default=4000, help="lines for the throughput test")
    ap.add_argument("--threads", type=int, action="append", help="torch threads (repeatable)")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--tone", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    import torch

    from couplet.predictor import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_random_model(Path(tmp) / "seed-size", args.vocab_size)
        predictor = Predictor.load(model_dir)
    rng = random.Random(0)
    singles = _lines(predictor.vocab, args.n, args.length, rng)
    lengths = [5, 6, 7, 7, 7, 8, 9, 10, 11, 12]
    batch = [line for n in lengths for line in _lines(predictor.vocab, args.batch_lines // len(lengths), n, rng)]
    options = predictor.decode_options(True, args.tone)  # the folder's rules (no_reuse as it says)
    report = {
        "model": str(model_dir) if args.model else f"random-init seed-size (embed 128, 6 blocks, vocab {len(predictor.vocab)})",
        "torch": torch.__version__,
        "cpu_count": __import__("os").cpu_count(),
        "length": args.length,
        "top_k": args.top_k,
        "runs": [],
    }
    for threads in args.threads or [1, torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for line in singles[:20]:  # warm-up
            predictor.match(line, top_k=args.top_k, tone=args.tone)
        lat, dec = [], []
        for line in singles:
            t0 = time.perf_counter()
            predictor.match(line, top_k=args.top_k, tone=args.tone)
            lat.append((time.perf_counter() - t0) * 1e3)
        lps = predictor.log_probs(singles[:200])
        for line, lp in zip(singles[:200], lps):
            t0 = time.perf_counter()
            predictor.answer(line, lp, args.top_k, options)  # the folder's search: exact, or fused as decode.json says
            dec.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        predictor.match_batch(batch, top_k=args.top_k, tone=args.tone)
        elapsed = time.perf_counter() - t0
        report["runs"].append(
            {
                "threads": threads,
                "match_ms": {"p50": _pct(lat, 0.5), "p90": _pct(lat, 0.9), "p99": _pct(lat, 0.99), "mean": statistics.fmean(lat)},
                "decode_ms": {"p50": _pct(dec, 0.5), "p90": _pct(dec, 0.9), "p99": _pct(dec, 0.99)},
                "batch_couplets_per_s": len(batch) / elapsed,
                "batch_lines": len(batch),
            }
        )
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return
    print(f"model: {report['model']}  torch {report['torch']}  cpus {report['cpu_count']}  length {args.length}  top_k {args.top_k}")
    for run in report["runs"]:
        m, d = run["match_ms"], run["decode_ms"]
        print(
            f"threads {run['threads']:>2}: match p50 {m['p50']:.2f} ms  p90 {m['p90']:.2f}  p99 {m['p99']:.2f}"
            f" | decode p50 {d['p50'] * 1e3:.0f} us  p99 {d['p99'] * 1e3:.0f} us"
            f" | batch {run['batch_couplets_per_s']:.0f} couplets/s ({run['batch_lines']} lines)"
        )


if __name__ == "__main__":
    main()
