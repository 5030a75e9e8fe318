"""Benchmark stages 1–3: a cold `couplet run --until build` on a fresh $COUPLET_HOME, then a cached re-run.

    .venv/bin/python scripts/bench_pipeline.py --source ../shared/datasets/poetry-lines.tar.gz

Runs: cold with a brand-new Prefect database, cold on a new $COUPLET_HOME (Prefect already set up),
then cached re-runs. Prints per-stage seconds, wall time (interpreter and Prefect start-up included) and peak RSS of the
largest process, as one JSON line per run. Targets (issue 2): cold stages ≤ 20 s in all with peak
RSS ≤ 2 GB; cached re-run ≤ 10 s wall.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(home: Path, prefect_home: Path, source: str) -> dict:
    env = {**os.environ, "COUPLET_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "couplet", "run", "--source", source, "--until", "build", "--json"],
        env=env, capture_output=True, text=True, cwd=home,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"couplet run failed: {proc.stderr.strip().splitlines()[-1]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # ru_maxrss of the children is the peak of the largest single descendant (KiB on Linux).
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "stages": {k: v for k, v in summary["stages"].items()},
        "stage_seconds_total": round(sum(v["seconds"] for v in summary["stages"].values()), 2),
        "wall_seconds": round(wall, 2),
        "peak_rss_mib_so_far": round(peak_mib),
        "counts": summary["counts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="../shared/datasets/poetry-lines.tar.gz")
    parser.add_argument("--cached-runs", type=int, default=3)
    args = parser.parse_args()
    source = str(Path(args.source).resolve())
    with tempfile.TemporaryDirectory(prefix="couplet-bench-") as tmp:
        prefect_home = Path(tmp) / "prefect"
        first_home, home = Path(tmp) / "home-1", Path(tmp) / "home-2"
        first_home.mkdir()
        home.mkdir()
        # 1: nothing exists, Prefect creates its database too (once per machine)
        print(json.dumps({"run": "cold+new-prefect-db", **run_once(first_home, prefect_home, source)}))
        # 2: a new $COUPLET_HOME with Prefect already set up: every stage computes from scratch
        print(json.dumps({"run": "cold", **run_once(home, prefect_home, source)}))
        for i in range(args.cached_runs):
            cached = run_once(home, prefect_home, source)
            print(json.dumps({"run": f"cached-{i + 1}", **cached}))


if __name__ == "__main__":
    main()
