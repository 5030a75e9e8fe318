#!/usr/bin/env python
"""The phrase memory's cost at a given size: counting time, table bytes, file size, and how much a process's RSS
grows when it loads the file (what `couplet serve` pays per worker).

    .venv/bin/python scripts/bench_phrase_memory.py --build-dir <home>/data/processed/build/<key> --pairs 770000

Counts the build's train split, plus, when `--pairs` asks for more, a random part of its `extra` split (a build
made with data.extra_source), so any size up to train + extra can be measured. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LOAD = """
import gc, sys
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
from couplet.decoding.phrases import PhraseMemory
gc.collect(); before = rss()
memory = PhraseMemory.load(sys.argv[1]); gc.collect()
print(rss() - before)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--pairs", type=int, default=0, help="pairs to count (0: the train split alone)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np

    from couplet.data.batches import load_split
    from couplet.data.build import read_build_manifest, read_build_vocab
    from couplet.decoding.phrases import PhraseMemory

    vocab_size = len(read_build_vocab(args.build_dir))
    buckets = {length: (up, down) for length, (up, down) in load_split(args.build_dir, "train").items()}
    have = sum(len(up) for up, _ in buckets.values())
    if args.pairs > have:
        if not read_build_manifest(args.build_dir).get("counts", {}).get("extra"):
            raise SystemExit(f"error: --pairs {args.pairs} needs a build with an extra split (data.extra_source); "
                             f"its train split has {have}")
        extra = load_split(args.build_dir, "extra")
        share = (args.pairs - have) / sum(len(up) for up, _ in extra.values())
        rng = np.random.default_rng(args.seed)
        for length, (up, down) in extra.items():
            keep = rng.random(len(up)) < share
            old_up, old_down = buckets.get(length, (up[:0], down[:0]))
            buckets[length] = (np.concatenate([old_up, up[keep]]), np.concatenate([old_down, down[keep]]))
    pairs = sum(len(up) for up, _ in buckets.values())
    start = time.perf_counter()
    memory = PhraseMemory.fit(buckets, vocab_size)
    fit_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "phrases.parquet"
        memory.save(path)
        out = subprocess.run([sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, check=True)
        report = {"pairs": pairs, "fit_s": round(fit_s, 2), **memory.describe(),
                  "file_mbytes": round(path.stat().st_size / 2**20, 1), "load_rss_mbytes": round(float(out.stdout), 1)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
