#!/usr/bin/env python
"""The per-character dictionary baseline (couplet.evaluation.baseline) on a build's test split.

    COUPLET_HOME=/tmp/cpl .venv/bin/couplet run --source ../shared/datasets/poetry-couplets.tar.gz --until build --json
    .venv/bin/python scripts/bench_baseline.py --build-dir /tmp/cpl/data/processed/build/<key>

Counts the train split's aligned character pairs, then scores the dictionary on the test split
exactly as the evaluate stage does (`evaluate_pairs`, the default constrained decoding), and for
reference with the seed's plain arg-max (the bare lookup table). Prints a Markdown table (one
row per decoding), the probe lines, and the timings; `--json` prints the metrics instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


COLUMNS = [
    ("ideograph_accuracy", "ideograph acc", "{:.3f}"),
    ("char_accuracy", "char acc", "{:.3f}"),
    ("exact_match", "exact", "{:.3f}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("length_match", "length", "{:.3f}"),
    ("punct_match", "punct", "{:.3f}"),
    ("repetition_match", "repetition", "{:.3f}"),
    ("copy_rate", "copy", "{:.3f}"),
    ("tone_rate", "tone", "{:.3f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", required=True, type=Path, help="a build folder (data/processed/build/<key>)")
    parser.add_argument("--max-eval", type=int, default=None, help="score the first N test pairs only")
    parser.add_argument("--tone", action="store_true", help="also enforce the final-tone rule")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)

    from couplet.evaluation.baseline import DictionaryBaseline
    from couplet.data.build import read_split_text
    from couplet.core.catalog import PROBE_LINES
    from couplet.evaluation.evaluate import evaluate_pairs

    started = time.perf_counter()
    baseline = DictionaryBaseline.from_build(args.build_dir)
    count_s = time.perf_counter() - started
    uppers, references = read_split_text(args.build_dir, "test")
    if args.max_eval is not None:
        uppers, references = uppers[: args.max_eval], references[: args.max_eval]
    rows = {}
    timings = {}
    for name, constrained in (("constrained (default)", True), ("argmax (lookup table)", False)):
        started = time.perf_counter()
        rows[name], _ = evaluate_pairs(baseline, uppers, references, constrained=constrained, tone=args.tone and constrained)
        timings[name] = time.perf_counter() - started
    probes = {line: baseline.match(line, allow_unknown=True, tone=args.tone).best for line in PROBE_LINES}

    if args.json:
        print(json.dumps({"rows": rows, "probes": probes, "count_s": count_s, "eval_s": timings}, ensure_ascii=False))
        return 0
    print(f"dictionary from {args.build_dir}: {count_s:.2f} s; {len(uppers)} test pairs\n")
    print("| decoding | " + " | ".join(label for _, label, _ in COLUMNS) + " | eval s |")
    print("| --- |" + " ---: |" * (len(COLUMNS) + 1))
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(fmt.format(m[key]) for key, _, fmt in COLUMNS) + f" | {timings[name]:.1f} |")
    print("\nprobes: " + ", ".join(f"{up} → {down}" for up, down in probes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
