"""Stage entry points that take the one `Config`, and the run summary. No Prefect in here:
`flows/pipeline.py` wraps these in tasks, and tests can call them directly."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import shutil
import time
from pathlib import Path


from couplet.atomic import atomic_write_json, atomic_write_text, read_json
from couplet.build import read_split_text, run_build
from couplet.config import Config
from couplet.ingest import run_ingest
from couplet.validate import run_validate

STAGES = ("ingest", "validate", "build", "train", "evaluate")


def with_source(config: Config, source: str) -> Config:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, source=source))


def ingest(config: Config, home: Path, force: bool = False) -> dict:
    return run_ingest(config.data, home, force=force)


def validate(ingested: dict, config: Config, home: Path, force: bool = False, flow_run_id: str | None = None) -> dict:
    return run_validate(ingested, config.data, home, force=force, flow_run_id=flow_run_id)


def build(validated: dict, config: Config, home: Path, force: bool = False) -> dict:
    return run_build(validated, config.data, home, force=force)


def summarize(results: dict[str, dict], seconds: float) -> dict:
    """The one-line JSON summary of `couplet run`."""
    summary: dict = {
        "stages": {name: {"status": r["status"], "seconds": r.get("seconds", 0.0)} for name, r in results.items()},
        "seconds": round(seconds, 3),
    }
    ingested = results.get("ingest", {})
    summary["dataset_version"] = ingested.get("dataset_version")
    counts = {}
    if "build" in results:
        counts.update(results["build"]["counts"])
    if "validate" in results:
        counts["rejected"] = results["validate"]["rejected"]
        summary["report"] = results["validate"]["report_path"]
        summary["data_docs"] = results["validate"].get("data_docs_page")
    summary["counts"] = counts
    if "build" in results:
        summary["build_dir"] = results["build"]["build_dir"]
    if "train" in results:
        summary["model"] = results["train"]["model"]
        summary["training"] = results["train"].get("training")
    if "evaluate" in results:
        summary["metrics"] = results["evaluate"]["metrics"]
    if "promote" in results:
        summary["promotion"] = results["promote"]["promotion"]
    return summary


# --------------------------------------------------------------------------- stages 4 and 5

TRAIN_CODE_VERSION = "train-1"
EVALUATE_CODE_VERSION = "evaluate-1"
PROBE_LINES = ("晚风摇树树还挺", "今天天气不错", "鱼跃此时海", "只有香如故")  # the seed article's four probes


def _hash(*parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:16]


def train(built: dict, config: Config, home: Path, force: bool = False, progress: bool = True) -> dict:
    """Stage 4: train the labeller on the build's shards into models/<run-id>/ (resumes a killed run)."""
    from couplet.locks import hold_lock
    from couplet.train import train_labeller

    start = time.perf_counter()
    key = _hash(TRAIN_CODE_VERSION, built["key"], config.section_hash("model", "train"))
    run_id = f"{built['dataset_version']}-{key[:8]}"
    model_dir = home / "models" / run_id
    marker = model_dir / "train.json"
    with hold_lock(home, f"models/{run_id}"):
        manifest = read_json(marker)
        if not force and manifest.get("key") == key and (model_dir / "model.safetensors").is_file():
            return {**manifest, "status": "cached", "seconds": round(time.perf_counter() - start, 3)}
        if force:
            marker.unlink(missing_ok=True)
            shutil.rmtree(model_dir / "checkpoints", ignore_errors=True)
        summary = train_labeller(Path(built["build_dir"]), config, model_dir, progress=progress)
        manifest = {
            "key": key,
            "stage": "train",
            "run_id": run_id,
            "model": str(model_dir),
            "build_key": built["key"],
            "dataset_version": built["dataset_version"],
            "training": {k: v for k, v in summary.items() if k != "model_dir"},
            "code_version": TRAIN_CODE_VERSION,
        }
        atomic_write_json(marker, manifest)
    return {**manifest, "status": "completed", "seconds": round(time.perf_counter() - start, 3)}


def samples_markdown(predictor, uppers: list[str], references: list[str], predictions: list[str], config: Config) -> tuple[str, list[dict]]:
    """The probe lines plus `n_samples` random test couplets with reference and output."""
    rows = []
    probes = predictor.match_batch(list(PROBE_LINES), constrained=config.decode.constrained, tone=config.decode.tone,
                                   allow_unknown=True, errors="return")
    for line, result in zip(PROBE_LINES, probes):
        rows.append({"kind": "probe", "upper": line, "reference": "", "output": getattr(result, "best", f"({result})")})
    rng = random.Random(config.train.seed)
    for i in sorted(rng.sample(range(len(uppers)), min(config.evaluate.n_samples, len(uppers)))):
        rows.append({"kind": "test", "upper": uppers[i], "reference": references[i], "output": predictions[i]})
    lines = ["## Evaluation samples", "", "| | upper (上联) | reference (下联) | model |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['kind']} | {r['upper']} | {r['reference']} | {r['output']} |" for r in rows]
    return "\n".join(lines) + "\n", rows


def evaluate(trained: dict, built: dict, config: Config, home: Path, force: bool = False) -> dict:
    """Stage 5: decode the test split with the trained model and score it."""
    from couplet.evaluate import evaluate_pairs
    from couplet.locks import hold_lock
    from couplet.predictor import Predictor
    from couplet.registry import fingerprint_pairs

    start = time.perf_counter()
    key = _hash(EVALUATE_CODE_VERSION, trained["key"], config.section_hash("decode", "evaluate"))
    with hold_lock(home, f"models/{trained['run_id']}"):  # metrics.json and samples.md are rewritten
        model_dir = Path(trained["model"])
        marker = model_dir / "evaluation.json"
        manifest = read_json(marker)
        if not force and manifest.get("key") == key and (model_dir / "metrics.json").is_file():
            return {**manifest, "status": "cached", "seconds": round(time.perf_counter() - start, 3)}

        uppers, references = read_split_text(built["build_dir"], "test")
        fingerprint = fingerprint_pairs(uppers, references, config.evaluate.max_eval)  # of the whole split
        if config.evaluate.max_eval is not None:
            uppers, references = uppers[: config.evaluate.max_eval], references[: config.evaluate.max_eval]
        predictor = Predictor.load(model_dir)
        metrics, predictions = evaluate_pairs(predictor, uppers, references, constrained=config.decode.constrained, tone=config.decode.tone)
        metrics["test_fingerprint"] = fingerprint
        metrics["n_test"] = len(uppers)
        samples_md, sample_rows = samples_markdown(predictor, uppers, references, predictions, config)

        all_metrics = read_json(model_dir / "metrics.json")
        all_metrics["test"] = metrics
        atomic_write_json(model_dir / "metrics.json", all_metrics)
        samples_path = model_dir / "samples.md"
        previous = samples_path.read_text(encoding="utf-8") if samples_path.is_file() else ""
        previous = previous.split("## Evaluation samples")[0].rstrip()
        atomic_write_text(samples_path, (previous + "\n\n" if previous else "") + samples_md)
        manifest = {
            "key": key,
            "stage": "evaluate",
            "model": str(model_dir),
            "run_id": trained["run_id"],
            "metrics": metrics,
            "samples": sample_rows,
            "code_version": EVALUATE_CODE_VERSION,
        }
        atomic_write_json(marker, manifest)
    return {**manifest, "status": "completed", "seconds": round(time.perf_counter() - start, 3)}
