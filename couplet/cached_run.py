"""`couplet run` when nothing changed, answered without Prefect.

Before the temporary Prefect server starts (seconds), `couplet run` asks `nothing_changed`: it computes
every stage's cache key here, as the stage's `run_<stage>` does, checks each output as `run_cached` would
(`damaged_output`), asks the registry whether the promotion was decided before, and looks up the flow run
that ended with these outputs in `$COUPLET_HOME/runs.json`. When all of that holds, the flow would only
report `cached` everywhere, so the CLI prints that summary and names the flow run whose outputs it reuses.

Any doubt goes through the flow instead: a URL source without a pinned `data.sha256` (only a download can
say whether it changed) or a URL `data.extra_source`, a source that is gone (the extra one too), a stage without
an intact output for its key (a changed parameter or module, a damaged file), a promotion to decide, or no flow
run recorded for the outputs.

`runs.json` is written by the flow (flows/pipeline.py): `{"<stage>/<key>": {"flow_run_id", "flow_run_name",
"finished"}}` for each stage output a successful flow run ended with, the newest `RUNS_KEPT` entries.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from couplet import registry
from couplet.core.atomic import atomic_write_json, read_json
from couplet.core.catalog import DATASET_LAYOUT, MODEL_FILES, RAW_FILES, STAGE_MANIFEST, Catalog
from couplet.core.config import Config, DataConfig
from couplet.core.locks import hold_lock
from couplet.core.stage import damaged_output, read_stage_manifest
from couplet.data.build import build_key
from couplet.data.extra import extra_data_config
from couplet.data.ingest import ingest_key
from couplet.data.raw import IngestError, find_layout, is_url, read_raw_manifest, sha256_file, sha256_layout
from couplet.data.validate import validate_key
from couplet.evaluation.evaluate import evaluate_key
from couplet.modelling.train import train_key, train_run_id
from couplet.summary import summarize

RUNS_KEPT = 1000  # entries of runs.json: the newest


def record_flow_run(home: Path, results: dict[str, dict], flow_run_id: str, flow_run_name: str) -> None:
    """Note that this flow run ended with these stage outputs (the results that carry a cache key)."""
    entry = {"flow_run_id": flow_run_id, "flow_run_name": flow_run_name,
             "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = Catalog(home).runs_record
    with hold_lock(home, path.name):
        runs = _read_runs(path)
        runs.update({f"{stage}/{result['key']}": entry for stage, result in results.items() if result.get("key")})
        newest = sorted(runs.items(), key=lambda item: item[1].get("finished", ""))[-RUNS_KEPT:]
        atomic_write_json(path, dict(newest))


def recorded_flow_run(home: Path, stage: str, key: str) -> dict | None:
    """The last flow run that ended with this stage output, or None."""
    return _read_runs(Catalog(home).runs_record).get(f"{stage}/{key}")


def _read_runs(path: Path) -> dict:
    runs = read_json(path)
    return runs if isinstance(runs, dict) else {}


def nothing_changed(config: Config, home: Path, until: str, promote: bool) -> tuple[dict, dict] | None:
    """(the run's summary, the flow run recorded for its outputs) when every stage up to `until` is
    cached and intact, and the promotion after evaluate was decided before; None otherwise."""
    started = time.perf_counter()
    sha256 = _source_sha256(config.data, home)
    extra_sha256 = _source_sha256(extra_data_config(config.data), home) if config.data.extra_source else None
    if sha256 is None or (config.data.extra_source and extra_sha256 is None):
        return None
    results: dict[str, dict] = {}
    for stage, result in _cached_stages(config, home, sha256, extra_sha256):
        if result is None:
            return None
        results[stage] = result
        if stage == until:
            break
    flow_run = recorded_flow_run(home, until, results[until]["key"])
    if flow_run is None:
        return None
    if until == "evaluate" and promote:
        promoted = _decided_promotion(config, home, results["evaluate"])
        if promoted is None:
            return None
        results["promote"] = promoted
    return summarize(results, seconds=time.perf_counter() - started), flow_run


def _source_sha256(cfg: DataConfig, home: Path) -> str | None:
    """The sha256 ingest finds for the source when that needs no download and the raw layer holds its copy."""
    expected = cfg.sha256.lower() if cfg.sha256 else None
    if is_url(cfg.source):
        sha256 = expected  # pinned: ingest takes the raw copy without asking the server
    else:
        path = Path(cfg.source).expanduser()
        try:
            sha256 = sha256_layout(find_layout(path)) if path.is_dir() else sha256_file(path)
        except (IngestError, OSError):  # gone or not a dataset: the flow says what to do
            return None
        if expected and sha256 != expected:
            return None
    if sha256 is None:
        return None
    root = Catalog(home).raw_dir(cfg.name) / RAW_FILES.dataset(sha256)
    manifest = read_raw_manifest(root)
    if manifest.get("sha256") != sha256 or not all((root / manifest.get("layout", "?") / name).is_file() for name in DATASET_LAYOUT.files):
        return None
    return sha256


def _cached_stages(config: Config, home: Path, sha256: str, extra_sha256: str | None = None) -> Iterator[tuple[str, dict | None]]:
    """(stage, its result as the flow returns it when cached, or None) in the order of STAGES; keys and
    folders as each `run_<stage>` makes them, paths resolved as it hands them back. The caller stops at None."""
    catalog = Catalog(home)
    ingested = _cached(catalog, "ingest", ingest_key(sha256), ("raw_dir", "pairs_path"))
    yield "ingest", ingested
    validated = _cached(catalog, "validate", validate_key(ingested["key"], config.data), ("passed_path", "rejects_path", "report_path"))
    if validated and validated.get("data_docs_page"):
        validated["data_docs_page"] = catalog.uri(validated["data_docs_page"])
    yield "validate", validated
    built = _cached(catalog, "build", build_key(validated["key"], config.data, extra_sha256), ("build_dir",))
    yield "build", built
    trained_key = train_key(built["key"], config)
    model_dir = catalog.model_dir(train_run_id(built["dataset_version"], trained_key))
    trained = _cached(catalog, "train", trained_key, ("model",), model_dir, MODEL_FILES.train_manifest)
    yield "train", trained
    yield "evaluate", _cached(catalog, "evaluate", evaluate_key(trained["key"], config), ("model",), model_dir,
                              MODEL_FILES.evaluate_manifest)


def _cached(catalog: Catalog, stage: str, key: str, paths: tuple[str, ...], folder: Path | None = None,
            manifest_name: str = STAGE_MANIFEST) -> dict | None:
    """The stage's manifest as `run_cached` returns it on a hit, or None when it would run the stage."""
    started = time.perf_counter()
    folder = folder or catalog.stage_dir(stage, key)
    try:
        manifest = read_stage_manifest(folder, manifest_name)
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or damaged_output(folder, manifest) is not None:
        return None
    return catalog.resolved({**manifest, "status": "cached", "seconds": round(time.perf_counter() - started, 3)}, paths)


def _decided_promotion(config: Config, home: Path, evaluated: dict) -> dict | None:
    """The promote step's result when the registry decided on this model before (flows/promote.py), else None."""
    started = time.perf_counter()
    try:
        registry.check_metric(config.promote.metric)
        record = registry.decided_before(evaluated["model"], evaluated["metrics"], home, config.promote.metric,
                                         require_baseline=config.promote.require_baseline)
    except (registry.RegistryError, ValueError):  # the flow reports it
        return None
    if record is None:
        return None
    return {"status": "cached", "seconds": round(time.perf_counter() - started, 3), "promotion": record}

