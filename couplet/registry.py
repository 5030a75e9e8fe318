"""Champion/challenger: which trained model `couplet match` and `couplet serve` use.

`$COUPLET_HOME/models/registry.json`:

    {"champion": "<run-id>" | null,          # a folder of models/; what readers load
     "champion_metrics": {...} | null,       # its test metrics, as recorded when it was promoted
     "updated": "<UTC time>",
     "history": [<one record per decision, oldest first>]}

A record: `time`, `run_id`, `model_dir` (relative to `$COUPLET_HOME`, as every record under it; older records:
absolute), `metric`, `promoted`, `reason`, `forced`,
`challenger_metrics`, `champion_before` (the champion it was compared with, or null),
`champion_metrics` (that champion's), `baseline_metrics` (the baseline's on the same test pairs, or null: the
phrase-table baseline, named by the challenger's `baseline` metric; records before it: the dictionary) and `baseline_gate` (whether the baseline rule below applied).
Metric sets are stored without nested values (the structure metrics' `references`, curves).

The rule (`decide_promotion`): a model whose test metrics say it does not beat the baseline (the aligned
phrase table's decoder; evaluations before it: the per-character dictionary) on ideograph accuracy (`beats_baseline: false`, written by the evaluate stage)
never becomes champion automatically (`promote.require_baseline=false` turns this off; `couplet
champion set <run-id> --force` overrides it). Otherwise a new model becomes champion only if it
beats the champion on the same test split by the configured metric (`promote.metric`, default
`bleu`, char-level BLEU); `exact_match`, then `char_accuracy`, break ties; a full tie keeps the
champion. No champion: the challenger is promoted. Metrics carry `test_fingerprint` (see `test_fingerprint`); when the two
fingerprints differ, the scores are not comparable and, since re-evaluating the champion is out of
scope, the challenger is *not* promoted: the champion keeps serving and the reason says how to
promote by hand (`couplet champion set <run-id> --force`). A model that is not
promoted keeps its folder.

Deciding again on the same (challenger, champion, metrics) adds no record and returns the earlier
one with `status: "cached"`, so a re-run of a cached pipeline changes nothing. The champion itself
scored again with other metrics (a new test split) stays champion and takes the new scores.
Writers hold the `models/registry` lock (couplet.core.locks) and replace the file atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from couplet.core.atomic import atomic_write_json
from couplet.core.catalog import MODEL_FILES, Catalog, is_model_dir
from couplet.core.locks import hold_lock

PROMOTION_METRICS = ("bleu", "exact_match", "char_accuracy", "ideograph_accuracy")  # all higher-is-better
TIE_BREAKS = ("exact_match", "char_accuracy")
FINGERPRINT_KEY = "test_fingerprint"
REGISTRY_LOCK = "models/registry"
_EPS = 1e-9


class RegistryError(RuntimeError):
    """registry.json cannot be read, or a promotion request cannot be honoured."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def _number(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def check_metric(metric: str) -> None:
    """Raise ValueError unless `metric` can rank models (call it before training, not after)."""
    if metric not in PROMOTION_METRICS:
        raise ValueError(f"promote.metric must be one of {', '.join(PROMOTION_METRICS)}, not {metric!r}")


def decide_promotion(
    challenger_metrics: dict, champion_metrics: dict | None, metric: str = "bleu", *, require_baseline: bool = True
) -> Decision:
    """Should the challenger replace the champion? (the rule is in the module docstring)"""
    check_metric(metric)
    mine = _number(challenger_metrics, metric)
    if mine is None:
        raise ValueError(f"challenger metrics have no numeric {metric!r} (got {challenger_metrics.get(metric)!r})")
    if require_baseline and challenger_metrics.get("beats_baseline") is False:
        ours, base = (_number(challenger_metrics, k) for k in ("ideograph_accuracy", "baseline_ideograph_accuracy"))
        figures = f" ({ours:.4g} <= {base:.4g})" if ours is not None and base is not None else ""
        return Decision(
            False,
            f"does not beat the {challenger_metrics.get('baseline', 'dictionary baseline')} on ideograph_accuracy{figures}; "
            "not promoted automatically "
            "(promote by hand with `couplet champion set <run-id> --force`)",
        )
    if champion_metrics is None:
        return Decision(True, f"no champion yet; {metric} {mine:.4g}")
    ours, theirs = challenger_metrics.get(FINGERPRINT_KEY), champion_metrics.get(FINGERPRINT_KEY)
    if ours != theirs:
        return Decision(
            False,
            f"not comparable: evaluated on test split {ours or 'unknown'}, the champion on {theirs or 'unknown'}; "
            "champion kept (promote by hand with `couplet champion set <run-id> --force`)",
        )
    for key in (metric, *(k for k in TIE_BREAKS if k != metric)):
        a, b = _number(challenger_metrics, key), _number(champion_metrics, key)
        if a is None or b is None:
            if key == metric:
                return Decision(False, f"not comparable: the champion has no {metric} recorded; champion kept")
            continue
        if a > b + _EPS:
            return Decision(True, f"{key} {a:.4g} > champion's {b:.4g}" + ("" if key == metric else f" ({metric} tied)"))
        if a < b - _EPS:
            return Decision(False, f"{key} {a:.4g} < champion's {b:.4g}" + ("" if key == metric else f" ({metric} tied)") + "; champion kept")
    return Decision(False, f"ties the champion on {metric} {mine:.4g} and every tie-break; champion kept")


def test_fingerprint(build_dir: str | Path, max_eval: int | None = None) -> str:
    """16 hex digits naming the test set a model was scored on: the build's test pairs (as text,
    order-free, so the vocabulary does not change it) and `evaluate.max_eval`."""
    from couplet.data.build import read_split_text

    return fingerprint_pairs(*read_split_text(build_dir, "test"), max_eval=max_eval)


def fingerprint_pairs(uppers: list[str], references: list[str], max_eval: int | None = None) -> str:
    """`test_fingerprint` of test pairs already in memory."""
    rows = sorted(f"{up}\t{down}" for up, down in zip(uppers, references))
    digest = hashlib.sha256("\n".join(rows).encode("utf-8"))
    digest.update(f"\nmax_eval={max_eval}".encode())
    return digest.hexdigest()[:16]


def registry_path(home: str | Path) -> Path:
    return Catalog(Path(home)).registry_path


def read_registry(home: str | Path) -> dict:
    """The registry (an empty one if the file does not exist)."""
    path = registry_path(home)
    if not path.is_file():
        return {"champion": None, "champion_metrics": None, "history": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read {path}: {' '.join(str(exc).split())}; fix or move it away") from None
    if not isinstance(data, dict) or not isinstance(data.get("history", []), list):
        raise RegistryError(f"{path} is not a registry (expected {{\"champion\": ..., \"history\": [...]}})")
    data.setdefault("champion", None)
    data.setdefault("champion_metrics", None)
    data.setdefault("history", [])
    return data


def champion_dir(home: str | Path, *, strict: bool = False) -> Path | None:
    """The champion's model folder, or None when there is none (or its folder is gone).

    `strict`: a champion whose folder is not a model directory raises RegistryError instead (readers that
    serve the champion must not fall back silently). An unreadable registry.json always raises RegistryError.
    """
    champion = read_registry(home).get("champion")
    if not champion:
        return None
    path = Catalog(Path(home)).model_dir(str(champion))
    if is_model_dir(path):
        return path
    if strict:
        raise RegistryError(f"{registry_path(home)} names champion {champion!r} but {path} is not a model directory")
    return None


def _flat(metrics: dict) -> dict:
    """The metric set as stored: top-level scalars only (drops `references`, curves, lists)."""
    return {k: v for k, v in metrics.items() if v is None or isinstance(v, (str, int, float, bool))}


def _run_id(model_dir: str | Path, home: Path) -> tuple[str, Path]:
    path = Path(model_dir).resolve()
    models = Catalog(home).models_dir.resolve()
    if path.parent != models:
        raise RegistryError(f"{path} is not a folder of {models}; only models/<run-id>/ can be champion")
    if not is_model_dir(path):
        raise RegistryError(f"{path} is not a model directory (needs {', '.join(MODEL_FILES.required)})")
    return path.name, path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def promote(
    model_dir: str | Path, metrics: dict, home: str | Path, metric: str = "bleu", *,
    baseline_metrics: dict | None = None, require_baseline: bool = True, lock_timeout_s: float = 60.0,
) -> dict:
    """Decide whether `model_dir` (a `models/<run-id>/` folder, evaluated with test `metrics`)
    becomes champion and record the decision in registry.json. `baseline_metrics` (the dictionary
    baseline's test metrics) are recorded for the reader; the rule reads `metrics["beats_baseline"]`.
    Returns the decision record plus `champion` (the champion after the call) and `status`
    ("completed", or "cached" when this pair was decided before)."""
    home = Path(home)
    run_id, path = _run_id(model_dir, home)
    challenger = _flat(metrics)
    with hold_lock(home, REGISTRY_LOCK, timeout_s=lock_timeout_s):
        registry = read_registry(home)
        champion = registry["champion"]
        champion_metrics = registry["champion_metrics"] if champion else None
        if (old := _decided_before(registry, run_id, challenger, metric, require_baseline)) is not None:
            return {**old, "model_dir": str(path), "champion": champion, "status": "cached"}
        if champion == run_id:  # the champion scored again (e.g. on a new test split): keep its latest scores
            decision = Decision(True, "already the champion; its metrics are replaced by this evaluation")
        else:
            decision = decide_promotion(challenger, champion_metrics, metric, require_baseline=require_baseline)
        record = {
            "time": _now(), "run_id": run_id, "model_dir": Catalog(home).relative(path), "metric": metric,
            "promoted": decision.promote, "reason": decision.reason, "forced": False,
            "challenger_metrics": challenger, "champion_before": champion, "champion_metrics": champion_metrics,
            "baseline_metrics": _flat(baseline_metrics) if baseline_metrics else None, "baseline_gate": require_baseline,
        }
        _append(home, registry, record)
    return {**record, "model_dir": str(path), "champion": registry["champion"], "status": "completed"}


def _decided_before(registry: dict, run_id: str, challenger: dict, metric: str, require_baseline: bool) -> dict | None:
    """The earlier decision on the same challenger scores, metric and baseline rule against the same champion
    (or the one that made it the champion it still is), or None."""
    champion = registry["champion"]
    champion_metrics = registry["champion_metrics"] if champion else None
    for old in reversed(registry["history"]):
        if old.get("run_id") != run_id or old.get("metric") != metric or old.get("challenger_metrics") != challenger:
            continue
        if old.get("baseline_gate", True) != require_baseline:
            continue
        same_opponent = old.get("champion_before") == champion and old.get("champion_metrics") == champion_metrics
        if same_opponent or (old["promoted"] and champion == run_id and champion_metrics == challenger):
            return old
    return None


def decided_before(model_dir: str | Path, metrics: dict, home: str | Path, metric: str = "bleu", *,
                   require_baseline: bool = True) -> dict | None:
    """What `promote` returns when it has nothing to decide (status "cached"), read without the lock and
    writing nothing; None when `promote` would decide anew. `couplet run` with nothing changed asks this."""
    home = Path(home)
    run_id, path = _run_id(model_dir, home)
    registry = read_registry(home)
    old = _decided_before(registry, run_id, _flat(metrics), metric, require_baseline)
    return None if old is None else {**old, "model_dir": str(path), "champion": registry["champion"], "status": "cached"}


def force_promote(run_id: str, home: str | Path, reason: str = "promoted by hand", *, lock_timeout_s: float = 60.0) -> dict:
    """Make `run_id` champion regardless of the rule (an operator's decision, e.g. after a new test
    split). Its metrics are the last ones the pipeline recorded for it."""
    home = Path(home)
    run_id, path = _run_id(Catalog(home).model_dir(Path(run_id).name), home)
    with hold_lock(home, REGISTRY_LOCK, timeout_s=lock_timeout_s):
        registry = read_registry(home)
        seen = [r for r in registry["history"] if r.get("run_id") == run_id]
        if not seen:
            raise RegistryError(f"{run_id} was never evaluated by the pipeline (no record in {registry_path(home)})")
        record = {
            **seen[-1], "time": _now(), "model_dir": Catalog(home).relative(path), "promoted": True, "reason": reason,
            "forced": True, "champion_before": registry["champion"], "champion_metrics": registry["champion_metrics"],
        }
        _append(home, registry, record)
    return {**record, "model_dir": str(path), "champion": registry["champion"], "status": "completed"}


def _append(home: Path, registry: dict, record: dict) -> None:
    registry["history"].append(record)
    if record["promoted"]:
        registry["champion"] = record["run_id"]
        registry["champion_metrics"] = record["challenger_metrics"]
    registry["updated"] = record["time"]
    atomic_write_json(registry_path(home), registry)


def decision_markdown(record: dict) -> str:
    """A decision record as Markdown (the `couplet-promotion` artifact)."""
    verdict = "**promoted** to champion" if record["promoted"] else "**not promoted**"
    if record.get("status") == "cached":
        verdict += " (decided before; nothing changed)"
    lines = [
        f"## Model `{record['run_id']}`: {verdict}",
        "",
        f"Reason: {record['reason']}",
        "",
        f"Champion now: `{record.get('champion') or '-'}` (metric: `{record['metric']}`)",
        "",
    ]
    theirs = record.get("champion_metrics") or {}
    ours = record.get("challenger_metrics") or {}
    base = record.get("baseline_metrics")  # the baseline on the same test pairs, when recorded
    keys = [k for k in (*PROMOTION_METRICS, FINGERPRINT_KEY, "n") if k in ours or k in theirs]
    keys += sorted(k for k in ours.keys() | theirs.keys() if k not in keys)
    head = f"| metric | this model | champion before (`{record.get('champion_before') or '-'}`) |"
    base_name = ours.get("baseline", "dictionary baseline")
    lines += [head + (f" {base_name} |" if base else ""), "| --- | ---: | ---: |" + (" ---: |" if base else "")]
    def cell(value) -> str:
        return "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))

    lines += [f"| {k} | {cell(ours.get(k))} | {cell(theirs.get(k))} |" + (f" {cell(base.get(k))} |" if base else "")
              for k in keys]
    return "\n".join(lines) + "\n"

