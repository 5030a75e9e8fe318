"""`nothing_changed` (couplet/cached_run.py) on data stages run in process, no Prefect: the fast tier's check of
what `couplet run` answers without a server (tests/test_cli_run.py runs it end to end)."""

from __future__ import annotations

import pytest
from datagen import write_dataset_tarball

from couplet.cached_run import nothing_changed, record_flow_run, recorded_flow_run
from couplet.core.config import Config, DataConfig, replace
from couplet.data.build import run_build
from couplet.data.ingest import run_ingest
from couplet.data.validate import run_validate


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A home whose data stages ran once from a small dataset: (home, config, the stages' results)."""
    root = tmp_path_factory.mktemp("cached-run")
    home = root / "home"
    home.mkdir()
    config = Config(data=DataConfig(source=str(write_dataset_tarball(root / "couplet.tar.gz", n_train=120, n_test=20))))
    ingested = run_ingest(config.data, home)
    validated = run_validate(ingested, config.data, home)
    results = {"ingest": ingested, "validate": validated, "build": run_build(validated, config.data, home)}
    return home, config, results


def test_nothing_changed_needs_a_recorded_flow_run_then_answers_cached(built):
    home, config, results = built
    assert nothing_changed(config, home, "build", promote=False) is None  # no flow run ended with these outputs yet
    record_flow_run(home, results, "run-id-1", "brave-otter")
    assert recorded_flow_run(home, "build", results["build"]["key"])["flow_run_name"] == "brave-otter"

    summary, flow_run = nothing_changed(config, home, "build", promote=False)
    assert flow_run["flow_run_id"] == "run-id-1"
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == dict.fromkeys(results, "cached")
    assert summary["counts"] == {**results["build"]["counts"], "rejected": results["validate"]["rejected"]}
    assert summary["build_dir"] == results["build"]["build_dir"]
    assert summary["dataset_version"] == results["ingest"]["dataset_version"]


def test_a_changed_parameter_or_a_missing_source_goes_through_the_flow(built, tmp_path):
    home, config, results = built
    record_flow_run(home, results, "run-id-1", "brave-otter")
    assert nothing_changed(replace(config, "data", min_count=1), home, "build", promote=False) is None  # a new build key
    assert nothing_changed(replace(config, "data", source=str(tmp_path / "gone.tar.gz")), home, "build", promote=False) is None
    assert nothing_changed(config, home, "train", promote=False) is None  # nothing trained yet
