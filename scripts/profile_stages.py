"""Where stages 2–3 spend their time: the partitioned work (what Dask workers would get) against the work the
stage keeps in the flow's process. Library calls in one process, no Prefect, each part timed by wrapping it.

    .venv/bin/python scripts/profile_stages.py --source ../shared/datasets/poetry-lines.tar.gz

Prints one JSON line of seconds: importing Great Expectations (once per process; done first so it is not
charged to validate), validate and build in all, and inside them the row rules (`check_partition`), the GX
suite per chunk (`SuiteRun.add`), its set-up and merge (`SuiteRun.__init__`, `SuiteRun.finish`) and the build's
three rounds (`dedupe_partition`, `split_partition` — partitioned — and `shard_partition`, kept in the stage).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _timed(owner, name: str, key: str, seconds: dict) -> None:
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - started

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="../shared/datasets/poetry-lines.tar.gz")
    args = parser.parse_args()

    started = time.perf_counter()
    import great_expectations  # noqa: F401

    import_gx = time.perf_counter() - started
    import couplet.data.build as build
    import couplet.data.expectations as expectations
    import couplet.data.validate as validate
    from couplet.core.config import DataConfig
    from couplet.data.ingest import run_ingest

    seconds = dict.fromkeys(("check_partition", "gx_suite_add", "gx_suite_init", "gx_suite_finish",
                             "dedupe_partition", "split_partition", "shard_partition"), 0.0)
    _timed(validate, "check_partition", "check_partition", seconds)
    for method in ("add", "__init__", "finish"):
        _timed(expectations.SuiteRun, method, f"gx_suite_{method.strip('_')}", seconds)
    for name in ("dedupe_partition", "split_partition", "shard_partition"):
        _timed(build, name, name, seconds)

    config = DataConfig(source=str(Path(args.source).resolve()))
    with tempfile.TemporaryDirectory(prefix="couplet-profile-") as home:
        ingested = run_ingest(config, Path(home), progress=False)
        started = time.perf_counter()
        validated = validate.run_validate(ingested, config, Path(home))
        validate_s = time.perf_counter() - started
        started = time.perf_counter()
        build.run_build(validated, config, Path(home))
        build_s = time.perf_counter() - started
    print(json.dumps({"rows_in": validated["rows_in"], "import_gx": round(import_gx, 2), "validate": round(validate_s, 2),
                      "build": round(build_s, 2), **{k: round(v, 2) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
