#!/usr/bin/env python
"""Labeller variants trained under one wall-clock budget, scored on the test split (issue 9's ablation).

    .venv/bin/python scripts/bench_quality.py --budget-min 15 --variants seed,cosine-ema,refine
    .venv/bin/python scripts/bench_quality.py --budget-min 15 --parallel 2 --threads 1 --lm-weights 0.2,0.4

Each variant is a real `couplet run --until evaluate` on `--source` (default: the poetry couplets) with
configs/seed.yaml plus the variant's overrides and `train.max_minutes=<budget>`, all on one home so the
data stages run once. `--parallel 2 --threads 1` trains two variants at a time, one core each (equal
conditions for the pair, a fair comparison on a 2-core machine). The table has, per variant: train minutes,
tokens/s, valid loss, the test metrics, single-line p50 latency of `Predictor.match` (1 thread), and the
probe lines; the dictionary baseline is the last row. `--lm-weights` also picks a lower-line LM weight for
each variant on the valid split (kept only if it raises ideograph accuracy and BLEU together there) and
adds a test row for it. Prints Markdown; `--out FILE` writes the rows as JSON too.

Each run's evaluate chooses the phrase-memory weights on valid (evaluate.tune_decode), so the test metrics here
are the fused decoder's. The decoding levers alone (no reuse, the phrase memory, the phrase-table baseline) are
scored on the trained folders by scripts/bench_decoders.py, on test and on the outside set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_baseline import COLUMNS  # noqa: E402  (the same metric columns as the baseline's table)

SEED_ONLY = ["train.epochs=100", "train.patience=3"]  # the budget ends a run, or early stopping does
COSINE_EMA = ["train.lr_schedule=cosine", "train.warmup_steps=500", "train.ema_decay=0.999"]
VARIANTS: dict[str, list[str]] = {
    "seed": [],
    "cosine-ema": COSINE_EMA,
    "refine": ["model.kind=refine"],
    "refine-cosine-ema": ["model.kind=refine", *COSINE_EMA],
    "wide-cosine-ema": ["model.embed_dim=256", *COSINE_EMA],
    "deep-cosine-ema": ["model.n_blocks=10", *COSINE_EMA],
    "dropout-cosine-ema": ["model.dropout=0.4", *COSINE_EMA],
    "attention-cosine-ema": ["model.kind=attention", *COSINE_EMA],
    "cosine-ema-lr2e-3": ["train.lr=0.002", *COSINE_EMA],
    "attention-cosine-ema-lr2e-3": ["model.kind=attention", "train.lr=0.002", *COSINE_EMA],
    # issue 20's data lever: each pair's swap with the direction marker (configs/seed.yaml has neither)
    "attention-cosine-ema-swapped": ["model.kind=attention", *COSINE_EMA, "model.directions=2", "train.swapped_pairs=true"],
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                feats = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
                return f"{name}, {os.cpu_count()} cores, {feats}"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def couplet_run(home: Path, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "COUPLET_HOME": str(home)}
    cmd = [sys.executable, "-m", "couplet.cli", "run", "--json", *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log.with_suffix(".json"), "w"), stderr=open(log.with_suffix(".err"), "w"))


def read_summary(log: Path) -> dict:
    text = log.with_suffix(".json").read_text(encoding="utf-8").strip()
    if not text:
        raise SystemExit(f"no summary in {log.with_suffix('.json')}; see {log.with_suffix('.err')}")
    return json.loads(text.splitlines()[-1])


def latency_p50_ms(predictor, repeats: int = 200) -> float:
    from couplet.core.catalog import PROBE_LINES

    for line in PROBE_LINES:
        predictor.match(line)
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        predictor.match(PROBE_LINES[i % len(PROBE_LINES)])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def choose_lm_weight(predictor, lm, build_dir: Path, weights: list[float], max_valid: int) -> tuple[float, list[dict]]:
    """The LM weight kept on the valid split: the best BLEU among weights that raise ideograph accuracy and BLEU
    together over weight 0; 0 when none does."""
    from couplet.data.build import read_split_text
    from couplet.core.config import replace
    from couplet.decoding.settings import DecodeSettings
    from couplet.evaluation.evaluate import evaluate_pairs

    uppers, refs = read_split_text(build_dir, "valid")
    uppers, refs = uppers[:max_valid], refs[:max_valid]
    base_decoding, rows = predictor.decoding, []
    for weight in [0.0, *weights]:
        predictor.decoding = DecodeSettings(replace(predictor.config, "decode", lm_weight=weight).decode, lm if weight else None)
        metrics, _ = evaluate_pairs(predictor, uppers, refs)
        rows.append({"lm_weight": weight, "ideograph_accuracy": metrics["ideograph_accuracy"], "bleu": metrics["bleu"]})
    predictor.decoding = base_decoding
    off = rows[0]
    better = [r for r in rows[1:] if r["ideograph_accuracy"] > off["ideograph_accuracy"] and r["bleu"] > off["bleu"]]
    return (max(better, key=lambda r: r["bleu"])["lm_weight"] if better else 0.0), rows


def score_variant(name: str, summary: dict, args) -> list[dict]:
    from couplet.data.build import read_split_text
    from couplet.core.catalog import MODEL_FILES, PROBE_LINES
    from couplet.core.config import replace
    from couplet.evaluation.evaluate import evaluate_pairs
    from couplet.decoding.lm import CharBigramLM
    from couplet.decoding.settings import DecodeSettings
    from couplet.predictor import Predictor

    model_dir = Path(summary["model"])
    train_metrics = json.loads((model_dir / MODEL_FILES.metrics).read_text(encoding="utf-8"))
    predictor = Predictor.load(model_dir, num_threads=1)
    row = {
        "variant": name,
        "model": str(model_dir),
        "train_minutes": round(train_metrics["seconds"] / 60, 1),
        "steps": train_metrics["steps"],
        "epochs": train_metrics["epochs"],
        "tokens_per_s": train_metrics["tokens_per_s_overall"],
        "valid_loss": train_metrics["best_valid_loss"],
        "parameters": train_metrics["parameters"],
        "metrics": summary["metrics"],
        "p50_ms": round(latency_p50_ms(predictor), 2),
        "probes": {line: predictor.match(line).best for line in PROBE_LINES},
    }
    rows = [row]
    if args.lm_weights:
        build_dir = Path(summary["build_dir"])
        lm_path = model_dir / MODEL_FILES.lm
        if lm_path.is_file():
            lm = CharBigramLM.load(lm_path, vocab_size=len(predictor.vocab))
        else:  # a model trained before the train stage wrote its LM: fit it the same way
            lm = CharBigramLM.fit(read_split_text(build_dir, "train")[1], predictor.vocab)
        weight, valid_rows = choose_lm_weight(predictor, lm, build_dir, args.lm_weights, args.max_valid)
        row["lm_valid"] = valid_rows
        row["lm_weight_chosen"] = weight
        if weight:
            predictor.decoding = DecodeSettings(replace(predictor.config, "decode", lm_weight=weight).decode, lm)
            uppers, refs = read_split_text(build_dir, "test")
            metrics, _ = evaluate_pairs(predictor, uppers, refs)
            rows.append({**row, "variant": f"{name} + LM {weight:g}", "metrics": metrics,
                         "p50_ms": round(latency_p50_ms(predictor), 2),
                         "probes": {line: predictor.match(line).best for line in PROBE_LINES}})
    return rows


def markdown(rows: list[dict], baseline: dict) -> str:
    head = ["variant", "train min", "tokens/s", "valid loss", *(title for _, title, _ in COLUMNS), "p50 ms"]
    out = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        m = r["metrics"]
        cells = [r["variant"], f"{r['train_minutes']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['valid_loss']:.3f}",
                 *(fmt.format(m[key]) for key, _, fmt in COLUMNS), f"{r['p50_ms']:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    out.append("| dictionary baseline | — | — | — | " + " | ".join(fmt.format(baseline[key]) for key, _, fmt in COLUMNS) + " | — |")
    out.append("")
    out.append("| variant | " + " | ".join(rows[0]["probes"]) + " |")
    out.append("| --- |" + " --- |" * len(rows[0]["probes"]))
    for r in rows:
        out.append(f"| {r['variant']} | " + " | ".join(r["probes"].values()) + " |")
    return "\n".join(out)


def train_variants(names: list[str], args, threads: int, logs: Path, started: float) -> dict[str, dict]:
    """Run the data stages once, then each variant's `couplet run`, `args.parallel` at a time; their summaries."""
    built = couplet_run(args.home, ["--source", args.source, "--until", "build"], logs / "build")
    if built.wait():
        raise SystemExit(f"the data stages failed; see {logs / 'build.err'}")
    summaries: dict[str, dict] = {}
    for start in range(0, len(names), args.parallel):
        procs = {}
        for name in names[start : start + args.parallel]:
            overrides = [*SEED_ONLY, f"train.max_minutes={args.budget_min:g}", f"train.num_threads={threads}",
                         *VARIANTS[name], *args.set]
            sets = [x for o in overrides for x in ("--set", o)]
            procs[name] = couplet_run(args.home, ["--source", args.source, "--until", "evaluate",
                                                  "--config", str(ROOT / "configs/seed.yaml"), *sets], logs / name)
        for name, proc in procs.items():
            if proc.wait():
                raise SystemExit(f"variant {name} failed; see {logs / name}.err")
            summaries[name] = read_summary(logs / name)
            print(f"{name}: trained and evaluated ({(time.time() - started) / 60:.1f} min so far)", file=sys.stderr)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared/datasets/poetry-couplets.tar.gz"))
    parser.add_argument("--home", type=Path, default=Path("/tmp/bench-quality"))
    parser.add_argument("--variants", default="seed,cosine-ema", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--budget-min", type=float, default=15.0, help="training minutes per variant (train.max_minutes)")
    parser.add_argument("--parallel", type=int, default=1, help="variants trained at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / parallel)")
    parser.add_argument("--set", action="append", default=[], help="an override for every variant (section.key=value)")
    parser.add_argument("--lm-weights", type=lambda s: [float(w) for w in s.split(",") if w], default=[])
    parser.add_argument("--max-valid", type=int, default=2000, help="valid pairs used to choose the LM weight")
    parser.add_argument("--score-only", action="store_true", help="score the variants' finished runs in --home again; train nothing")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    logs = args.home / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)

    if args.score_only:
        summaries = {name: read_summary(logs / name) for name in names}
    else:
        summaries = train_variants(names, args, threads, logs, time.time())
    rows = [r for name in names for r in score_variant(name, summaries[name], args)]
    baseline = summaries[names[0]]["baseline"]
    print(f"CPU: {cpu_name()}; budget {args.budget_min:g} min a variant, {args.parallel} at a time, "
          f"{threads} thread(s) each; {time.strftime('%Y-%m-%d')}\n")
    print(markdown(rows, baseline))
    if args.out:
        record = {"cpu": cpu_name(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "rows": rows, "baseline": baseline}
        args.out.write_text(json.dumps(record, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
