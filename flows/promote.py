"""The champion/challenger step as a Prefect task (the rule and the registry live in couplet.registry).

In the flow, after evaluate:

    results["promote"] = promote_model(model, metrics, metric, home, baseline_metrics=..., require_baseline=...,
                                       return_state=True).result()
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from couplet import registry
from couplet.core.config import couplet_home


@task(name="promote", cache_policy=NO_CACHE)
def promote_model(
    model: str, metrics: dict, metric: str = "bleu", home: Path | None = None,
    baseline_metrics: dict | None = None, require_baseline: bool = True,
) -> dict:
    """Make `model` (a models/<run-id>/ folder) champion if it beats the current one on `metric`
    (and the dictionary baseline on ideograph accuracy, unless `require_baseline` is off).

    Returns `{"status", "seconds", "promotion": <decision record>}` (`promotion` lands in the
    pipeline summary). A decision taken before for the same inputs ends in the `Cached` state and
    publishes nothing; otherwise the decision is published as the `couplet-promotion` artifact.
    """
    started = time.perf_counter()
    record = registry.promote(model, metrics, home or couplet_home(), metric,
                              baseline_metrics=baseline_metrics, require_baseline=require_baseline)
    result = {"status": record["status"], "seconds": round(time.perf_counter() - started, 3), "promotion": record}
    verdict = "promoted" if record["promoted"] else "not promoted"
    print(f"promotion: {record['run_id']} {verdict} ({record['reason']}); champion {record['champion']}")
    if record["status"] == "cached":
        return Completed(data=result, name="Cached", message=f"decided before: {record['reason']}")
    create_markdown_artifact(
        key="couplet-promotion",
        markdown=registry.decision_markdown(record),
        description=f"{record['run_id']}: {verdict}",
    )
    return result
