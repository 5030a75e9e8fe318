"""Benchmark stages 1–3: a cold `couplet run --until build` on a fresh $COUPLET_HOME, then a cached re-run.

    .venv/bin/python scripts/bench_pipeline.py --source ../shared/datasets/poetry-lines.tar.gz
    .venv/bin/python scripts/bench_pipeline.py --scale 4 --runners local,dask --cached-runs 1

Runs: cold with a brand-new Prefect database (with --scale: ingest only), then per runner (`--runners`, default local) a cold run on a
new $COUPLET_HOME (Prefect already set up) and cached re-runs. Prints per-stage seconds, wall time
(interpreter and Prefect start-up included) and, per run, the peak RSS of the largest process and the
peak of the whole process tree's RSS (sampled every 0.2 s: the CLI, Prefect's temporary server and, for
`dask`, the LocalCluster's scheduler, nannies and workers), as one JSON line per run. Targets (issue 2):
cold stages ≤ 20 s in all with peak RSS ≤ 2 GB; cached re-run ≤ 10 s wall (issue 19: ≤ 3 s). A cached
re-run with nothing changed is answered without Prefect (couplet/cached_run.py); `reused` names the flow
run whose outputs it reused (null: the run went through Prefect).

`--scale K` benchmarks a corpus K times the size of `--source` (default: poetry-lines): its train split
plus K−1 copies in which the lower lines are shuffled among the upper lines of the same length and
punctuation positions (new pairs that pass validation); the test split is kept as it is.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from couplet.data.punct import PUNCTUATION


def _tree_rss(root: int) -> tuple[int, int]:
    """(sum of VmRSS, max of VmHWM) in KiB over `root` and its descendants, read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(frontier)
    total = peak = 0
    for pid in tree:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0])
        peak = max(peak, int(fields.get("VmHWM", "0 kB").split()[0]))
    return total, peak


def run_once(home: Path, prefect_home: Path, source: str, runner: str = "local", until: str = "build") -> dict:
    env = {**os.environ, "COUPLET_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "couplet", "run", "--source", source, "--until", until, "--runner", runner, "--json"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home)
    peaks = {"tree": 0, "process": 0}

    def sample() -> None:
        while proc.poll() is None:
            total, peak = _tree_rss(proc.pid)
            peaks["tree"], peaks["process"] = max(peaks["tree"], total), max(peaks["process"], peak)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"couplet run failed: {(stderr.strip().splitlines() or ['?'])[-1]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {
        "runner": runner,
        "stages": {k: v for k, v in summary["stages"].items()},
        "stage_seconds_total": round(sum(v["seconds"] for v in summary["stages"].values()), 2),
        "wall_seconds": round(wall, 2),
        "peak_rss_mib": round(peaks["process"] / 1024),  # the largest single process
        "peak_tree_rss_mib": round(peaks["tree"] / 1024),  # every process of the run together
        "counts": summary["counts"],
        "reused": next((line.split("flow run ")[1].split(" (")[0] for line in stderr.splitlines() if "nothing changed:" in line), None),
    }


def scaled_source(source: Path, scale: int, folder: Path) -> Path:
    """`source`'s train split plus `scale - 1` copies with the lower lines shuffled within each line shape."""
    with tarfile.open(source, "r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    ups = files["couplet/train/in.txt"].decode().splitlines(keepends=True)
    downs = np.array(files["couplet/train/out.txt"].decode().splitlines(keepends=True), dtype=object)
    # lower lines move only among upper lines of the same length and punctuation positions, so the new pairs pass validation
    marks = re.compile(f"[^{re.escape(''.join(sorted(PUNCTUATION)))}]")
    shapes = {}
    lengths = np.array([shapes.setdefault(marks.sub(".", line), len(shapes)) for line in ups])
    new_ups, new_downs = list(ups), list(downs)
    for copy in range(1, scale):
        rng = np.random.default_rng(copy)
        shuffled = downs.copy()
        for length in np.unique(lengths):
            idx = np.flatnonzero(lengths == length)
            shuffled[idx] = downs[rng.permutation(idx)]
        new_ups += ups
        new_downs += shuffled.tolist()
    files["couplet/train/in.txt"] = "".join(new_ups).encode()
    files["couplet/train/out.txt"] = "".join(new_downs).encode()
    path = folder / f"scale-{scale}.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="../shared/datasets/poetry-lines.tar.gz")
    parser.add_argument("--cached-runs", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="K: a corpus K times the source's train split (default 1: as it is)")
    parser.add_argument("--runners", default="local", help="comma-separated: local, dask (default: local)")
    args = parser.parse_args()
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    with tempfile.TemporaryDirectory(prefix="couplet-bench-") as tmp:
        source = str(Path(args.source).resolve())
        if args.scale > 1:
            started = time.perf_counter()
            source = str(scaled_source(Path(source), args.scale, Path(tmp)))
            print(json.dumps({"scaled_source": source, "scale": args.scale, "seconds": round(time.perf_counter() - started, 1),
                              "bytes": os.path.getsize(source)}))
        prefect_home = Path(tmp) / "prefect"
        first_home = Path(tmp) / "home-0"
        first_home.mkdir()
        # 1: nothing exists, Prefect creates its database too (once per machine); scaled runs only ingest here
        until = "build" if args.scale == 1 else "ingest"
        print(json.dumps({"run": "cold+new-prefect-db" + ("" if until == "build" else " (ingest only)"), "scale": args.scale,
                          **run_once(first_home, prefect_home, source, runners[0], until)}), flush=True)
        for runner in runners:
            # 2: a new $COUPLET_HOME with Prefect already set up: every stage computes from scratch
            home = Path(tmp) / f"home-{runner}"
            home.mkdir()
            print(json.dumps({"run": "cold", "scale": args.scale, **run_once(home, prefect_home, source, runner)}), flush=True)
            for i in range(args.cached_runs):
                print(json.dumps({"run": f"cached-{i + 1}", "scale": args.scale, **run_once(home, prefect_home, source, runner)}), flush=True)


if __name__ == "__main__":
    main()
