"""The Great Expectations side of stage 2: the versioned suite `couplet/suites/couplet_pairs.json`
run as a checkpoint in the file context under `reports/gx/`, which also builds the Data Docs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from couplet.catalog import Catalog

SUITE_PATH = Path(__file__).parent / "suites" / "couplet_pairs.json"


def load_suite_spec(parameters: dict) -> dict:
    """The suite file with each `{"$PARAMETER": name}` replaced by its value.

    Substituted before GX sees the suite (rather than passed as GX expectation parameters)
    because GX's Data Docs renderers cannot format a parameterised `mostly`.
    """

    def fill(node):
        if isinstance(node, dict):
            if set(node) == {"$PARAMETER"}:
                return parameters[node["$PARAMETER"]]
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    return fill(json.loads(SUITE_PATH.read_text(encoding="utf-8")))


def suite_version() -> str:
    return hashlib.sha256(SUITE_PATH.read_bytes()).hexdigest()[:12]



def run_gx_suite(frame, home: Path, parameters: dict, run_name: str) -> dict:
    """Run the versioned suite (its `$PARAMETER`s filled from `parameters`) on `frame` in the file
    context under reports/gx; returns success, per-expectation stats and the Data Docs page."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(Catalog(home).reports_dir))
    if context.variables.progress_bars is None:
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.variables.save()
    spec = load_suite_spec(parameters)
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=spec["name"], expectations=spec["expectations"], meta=spec["meta"])
    )
    source = context.data_sources.add_or_update_pandas(name="couplet_dataset")
    try:
        asset = source.get_asset("pairs")
    except LookupError:
        asset = source.add_dataframe_asset(name="pairs")
    try:
        batch_definition = asset.get_batch_definition("all_rows")
    except (KeyError, LookupError, ValueError):
        batch_definition = asset.add_batch_definition_whole_dataframe("all_rows")
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name="couplet_pairs_alignment", data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name="couplet_pairs_checkpoint",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "SUMMARY"},
        )
    )
    result = checkpoint.run(
        batch_parameters={"dataframe": frame},
        run_id=RunIdentifier(run_name=run_name),
    )
    identifier, run_result = next(iter(result.run_results.items()))
    expectations = []
    for r in run_result.results:
        cfg_ = r.expectation_config
        expectations.append(
            {
                "expectation": cfg_.type,
                "column": cfg_.kwargs.get("column") or ",".join(cfg_.kwargs.get("column_list", []) or [])
                or f"{cfg_.kwargs.get('column_A', '')}={cfg_.kwargs.get('column_B', '')}".strip("="),
                "rule": (cfg_.meta or {}).get("rule", ""),
                "success": bool(r.success),
                "unexpected_percent": round(float(r.result.get("unexpected_percent") or 0.0), 4),
                "unexpected_count": int(r.result.get("unexpected_count") or 0),
            }
        )
    page = None
    for site in context.get_docs_sites_urls(resource_identifier=identifier):
        page = site.get("site_url")
    index = Catalog(home).data_docs_index
    return {"success": bool(result.success), "expectations": expectations, "data_docs_page": page, "data_docs_index": str(index)}
