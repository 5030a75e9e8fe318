#!/usr/bin/env python
"""Trained models and the dictionary baseline on real couplets from outside every corpus we have.

    .venv/bin/python scripts/bench_outside.py --build-dir /tmp/bq1/data/processed/build/<key> \
        seed=/tmp/bq1/models/<run-id> attention=/tmp/bq1/models/<run-id> ...

scripts/outside/in.txt and out.txt (the dataset's layout) hold well-known couplets (New Year couplets,
study mottoes, classical riddle couplets) checked to be in neither ../shared corpus (see docs/benchmarks.md).
They are few, so this is a sanity check against over-fitting one test split, not a precise measurement.
Prints a Markdown table of ideograph accuracy and BLEU, and each model's lower lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, required=True, help="the build whose train split the baseline counts")
    parser.add_argument("--pairs", type=Path, default=ROOT / "scripts" / "outside", help="folder with in.txt and out.txt")
    parser.add_argument("models", nargs="+", help="name=model-folder")
    args = parser.parse_args(argv)

    from couplet.evaluation.baseline import DictionaryBaseline
    from couplet.evaluation.evaluate import evaluate_pairs, read_pair_files
    from couplet.predictor import Predictor

    uppers, refs = read_pair_files(args.pairs / "in.txt", args.pairs / "out.txt")
    answerers = [(name, Predictor.load(Path(folder), num_threads=1)) for name, folder in (m.split("=", 1) for m in args.models)]
    answerers.append(("dictionary baseline", DictionaryBaseline.from_build(args.build_dir)))
    lines = {}
    print(f"{len(uppers)} couplets from outside the corpora\n")
    print("| answerer | ideograph acc | BLEU |\n| --- | ---: | ---: |")
    for name, predictor in answerers:
        metrics, predictions = evaluate_pairs(predictor, uppers, refs)
        lines[name] = predictions
        print(f"| {name} | {metrics['ideograph_accuracy']:.3f} | {metrics['bleu']:.2f} |")
    print("\n| upper | reference | " + " | ".join(lines) + " |\n| --- | --- |" + " --- |" * len(lines))
    for i, (upper, ref) in enumerate(zip(uppers, refs)):
        print(f"| {''.join(upper.split())} | {''.join(ref.split())} | " + " | ".join(lines[name][i] for name in lines) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
