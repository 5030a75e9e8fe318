"""The Great Expectations side of stage 2: the versioned suite `couplet/data/suites/couplet_pairs.json`
run as a checkpoint in the file context under `reports/gx/`, which also builds the Data Docs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from couplet.core.catalog import Catalog

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



PARTIAL_UNEXPECTED = 20  # GX's default partial_unexpected_count: examples kept per expectation


class SuiteRun:
    """The versioned suite (its `$PARAMETER`s filled from `parameters`) over one batch that arrives in chunks.

    `add(frame)` validates one chunk (a pandas frame of the GX columns; its index is the rows' position
    in the batch) as `Batch.validate` does, storing nothing; `finish()` merges the chunks' results into
    the batch's result — counts summed, percentages and `mostly` recomputed over all rows, the first
    unexpected values kept — stores that one result in the file context under reports/gx and builds its
    Data Docs page (what a checkpoint's UpdateDataDocsAction does), so each run has one result and one page
    however many chunks it had. Memory: one chunk, not the batch.
    """

    def __init__(self, home: Path, parameters: dict, run_name: str):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.home = home
        self.run_name = run_name
        self.context = context = gx.get_context(mode="file", project_root_dir=str(Catalog(home).gx_project_root))
        if context.variables.progress_bars is None:
            context.variables.progress_bars = ProgressBarsConfig(globally=False)
            context.variables.save()
        spec = load_suite_spec(parameters)
        self.suite = context.suites.add_or_update(
            gx.ExpectationSuite(name=spec["name"], expectations=spec["expectations"], meta=spec["meta"])
        )
        source = context.data_sources.add_or_update_pandas(name="couplet_dataset")
        try:
            asset = source.get_asset("pairs")
        except LookupError:
            asset = source.add_dataframe_asset(name="pairs")
        try:
            self.batch_definition = asset.get_batch_definition("all_rows")
        except (KeyError, LookupError, ValueError):
            self.batch_definition = asset.add_batch_definition_whole_dataframe("all_rows")
        self.result = None  # the first chunk's ExpectationSuiteValidationResult, merged into by later chunks
        self.batch_id = None
        self.totals: list[dict] = []
        self.chunks = 0

    def add(self, frame) -> None:
        # what Batch.validate and ValidationDefinition.run do, with the batch built once (GX hashes each frame it gets)
        from great_expectations.validator.v1_validator import Validator

        validator = Validator(batch_definition=self.batch_definition, batch_parameters={"dataframe": frame},
                              result_format={"result_format": "SUMMARY"})
        result = validator.validate_expectation_suite(self.suite)
        if self.result is None:
            self.result, self.batch_id = result, validator.active_batch_id
            self.totals = [{} for _ in result.results]
        for total, part in zip(self.totals, result.results, strict=True):
            _merge_counts(total, part.result)
        self.chunks += 1

    def finish(self) -> dict:
        """Store the merged result, build its Data Docs page; success, per-expectation stats and the page."""
        import datetime

        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )
        from great_expectations.core.run_identifier import RunIdentifier

        if self.result is None:
            raise ValueError("no chunk was validated")
        result = self.result
        for expectation, total in zip(result.results, self.totals):
            expectation.result = _merged_result(total)
            expectation.success = _success(expectation.expectation_config, expectation.result)
        successful = sum(1 for e in result.results if e.success)
        result.success = successful == len(result.results)
        result.statistics = {
            "evaluated_expectations": len(result.results),
            "successful_expectations": successful,
            "unsuccessful_expectations": len(result.results) - successful,
            "success_percent": 100.0 * successful / len(result.results) if result.results else None,
        }
        run_id = RunIdentifier(run_name=self.run_name, run_time=datetime.datetime.now(datetime.timezone.utc))
        result.meta.update({"run_id": run_id, "validation_time": run_id.run_time, "batch_parameters": {"dataframe": "<DATAFRAME>"},
                            "chunks": self.chunks})
        suite_id = ExpectationSuiteIdentifier(name=self.suite.name)
        identifier = ValidationResultIdentifier(expectation_suite_identifier=suite_id, run_id=run_id, batch_identifier=self.batch_id)
        self.context.validation_results_store.store_validation_results(
            suite_validation_result=result, suite_validation_result_identifier=identifier, expectation_suite_identifier=suite_id
        )
        self.context.build_data_docs(resource_identifiers=[identifier, suite_id])
        expectations = []
        for r in result.results:
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
        for site in self.context.get_docs_sites_urls(resource_identifier=identifier):
            page = site.get("site_url")
        index = Catalog(self.home).data_docs_index
        return {"success": bool(result.success), "expectations": expectations, "data_docs_page": page, "data_docs_index": str(index)}


def _merge_counts(total: dict, part: dict) -> None:
    """Add one chunk's SUMMARY result of an expectation to the running `total`."""
    for key in ("element_count", "unexpected_count", "missing_count"):
        if key in part:
            total[key] = total.get(key, 0) + int(part[key] or 0)
    if "observed_value" in part:  # expect_table_row_count_to_be_between
        total["observed_value"] = total.get("observed_value", 0) + int(part["observed_value"] or 0)
    for key in ("partial_unexpected_list", "partial_unexpected_index_list"):
        if key in part:
            total[key] = (total.get(key, []) + list(part[key] or []))[:PARTIAL_UNEXPECTED]


def _merged_result(total: dict) -> dict:
    """The SUMMARY result of an expectation over the whole batch, from its summed counts."""
    if "element_count" not in total:
        return {k: v for k, v in total.items() if k == "observed_value"}
    element, unexpected, missing = total["element_count"], total.get("unexpected_count", 0), total.get("missing_count", 0)
    nonmissing = element - missing
    partial = total.get("partial_unexpected_list", [])
    counts: dict = {}
    for value in partial:
        value = value if getattr(value, "__hash__", None) else repr(value)
        counts[value] = counts.get(value, 0) + 1
    result = {
        "element_count": element,
        "unexpected_count": unexpected,
        "unexpected_percent": 100.0 * unexpected / nonmissing if nonmissing else None,
        "partial_unexpected_list": partial,
        "missing_count": missing,
        "missing_percent": 100.0 * missing / element if element else None,
        "unexpected_percent_total": 100.0 * unexpected / element if element else None,
        "unexpected_percent_nonmissing": 100.0 * unexpected / nonmissing if nonmissing else None,
        "partial_unexpected_counts": [{"value": v, "count": n} for v, n in sorted(counts.items(), key=lambda kv: -kv[1])],
    }
    if "partial_unexpected_index_list" in total:
        result["partial_unexpected_index_list"] = total["partial_unexpected_index_list"]
    return result


def _success(config, result: dict) -> bool:
    """An expectation's verdict on the whole batch, as GX decides it (`mostly` over the rows considered)."""
    kwargs = config.kwargs
    if "observed_value" in result:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        value = result["observed_value"]
        return (low is None or value >= low) and (high is None or value <= high)
    considered = result["element_count"] - result["missing_count"]
    if not considered:
        return True  # vacuously true, as in GX
    mostly = kwargs.get("mostly")
    mostly = 1.0 if mostly is None else float(mostly)
    return (considered - result["unexpected_count"]) / considered >= mostly


def run_gx_suite(frame, home: Path, parameters: dict, run_name: str) -> dict:
    """The suite on one whole frame (one chunk); see `SuiteRun`."""
    suite_run = SuiteRun(home, parameters, run_name)
    suite_run.add(frame)
    return suite_run.finish()
