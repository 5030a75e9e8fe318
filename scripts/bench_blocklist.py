#!/usr/bin/env python
"""Blocklist matching cost per line (issue 18: ≤ 1 ms a line for a 10k-word list); prints one JSON line.

    .venv/bin/python scripts/bench_blocklist.py [--words 10000] [--lines 20000]

Random words of 2-4 characters (and a few single characters) over 3 000 ideographs, random lines of 5, 7 and 11
characters; times `Blocklist.find` over every line, three repeats, and reports the median per line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from couplet.decoding.blocklist import Blocklist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=10_000)
    parser.add_argument("--lines", type=int, default=20_000)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(3000)]
    words = {"".join(rng.choice(chars) for _ in range(rng.choice([1, 2, 2, 2, 3, 4]) if rng.random() < 0.01 else
                                                        rng.choice([2, 2, 3, 4]))) for _ in range(args.words)}
    blocklist = Blocklist(words)
    lines = ["".join(rng.choice(chars) for _ in range(rng.choice([5, 7, 11]))) for _ in range(args.lines)]
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        hits = sum(blocklist.find(line) is not None for line in lines)
        runs.append((time.perf_counter() - started) / len(lines))
    print(json.dumps({"words": len(blocklist), "lines": len(lines), "hits": hits,
                      "us_per_line_median": round(statistics.median(runs) * 1e6, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
