"""A relocatable home: records under $COUPLET_HOME name paths relative to it, so a home copied elsewhere works."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN

from couplet.core.catalog import Catalog


# --------------------------------------------------------------------------- Catalog.relative / resolve


def test_relative_names_paths_under_the_home_in_posix_form(tmp_path):
    catalog = Catalog(tmp_path / "home")
    run = catalog.model_dir("abc-123")
    assert catalog.relative(run) == "models/abc-123"
    assert catalog.relative(str(catalog.stage_dir("build", "k") / "train" / "len-05.parquet")) == "data/processed/build/k/train/len-05.parquet"
    assert catalog.relative("models/abc-123") == "models/abc-123"  # already a record
    page = (catalog.reports_dir / "gx" / "index.html").as_uri()
    assert catalog.relative(page) == "reports/gx/index.html"  # a file:// URL (GX Data Docs)
    outside = tmp_path / "src" / "couplet.tar.gz"
    assert catalog.relative(outside) == str(outside)  # an input outside the home stays absolute


def test_relative_sees_through_a_symlinked_home(tmp_path):
    real = tmp_path / "real"
    (real / "models" / "m").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert Catalog(link).relative(real / "models" / "m") == "models/m"
    assert Catalog(real).relative(link / "models" / "m") == "models/m"


def test_resolve_joins_records_to_the_current_home(tmp_path):
    catalog = Catalog(tmp_path / "b")
    assert catalog.resolve("models/abc-123") == tmp_path / "b" / "models" / "abc-123"
    assert catalog.resolve(catalog.relative(catalog.validation_report_dir("r1"))) == catalog.validation_report_dir("r1")
    assert catalog.uri("reports/gx/x y.html") == (tmp_path / "b" / "reports" / "gx" / "x y.html").as_uri()
    assert catalog.uri("https://example.org/docs/index.html") == "https://example.org/docs/index.html"


def test_resolve_reads_old_absolute_records(tmp_path):
    """Records written before paths were relative hold the old home's absolute paths."""
    old_home, new_home = tmp_path / "models" / "old-home", tmp_path / "new-home"  # "models" in the old home's own path
    existing = tmp_path / "elsewhere" / "data" / "processed" / "build" / "k"
    existing.mkdir(parents=True)
    catalog = Catalog(new_home)
    assert catalog.resolve(str(existing)) == existing  # absolute and still there: used as is

    for rel in ("models/run-1", "data/processed/ingest/k1/pairs.parquet", "reports/validation/r1"):
        (new_home / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".parquet"):
            (new_home / rel).touch()
        else:
            (new_home / rel).mkdir()
        recorded = str(old_home / rel)  # the old home is gone: the layout part is re-anchored here
        assert catalog.resolve(recorded) == new_home / rel
    page = (old_home / "reports" / "validation" / "r1").as_uri()
    assert catalog.resolve(page) == new_home / "reports" / "validation" / "r1"
    assert catalog.uri(page) == (new_home / "reports" / "validation" / "r1").as_uri()

    gone = str(old_home / "models" / "never-copied")
    assert catalog.resolve(gone) == Path(gone)  # nothing to re-anchor to: the path as recorded, for the error


def test_resolved_turns_the_named_fields_into_paths_under_the_home(tmp_path):
    catalog = Catalog(tmp_path / "home")
    record = {"build_dir": "data/processed/build/k", "key": "k", "model": None}
    out = catalog.resolved(record, ("build_dir", "model", "absent"))
    assert out == {"build_dir": str(tmp_path / "home" / "data" / "processed" / "build" / "k"), "key": "k", "model": None}
    assert record["build_dir"] == "data/processed/build/k"  # a copy


def test_old_absolute_records_of_a_moved_home_are_read(tmp_path):
    """A report index and a registry written by an older version, in a home restored elsewhere."""
    from couplet.registry import force_promote, read_registry
    from couplet.data.validate import latest_report

    old, home = tmp_path / "gone", tmp_path / "restored"
    catalog = Catalog(home)
    report_dir = catalog.validation_report_dir("r1")
    report_dir.mkdir(parents=True)
    (report_dir / "report.md").write_text("# report\n")
    page = catalog.reports_dir / "gx" / "validations" / "r1.html"
    page.parent.mkdir(parents=True)
    page.touch()
    old_entry = {"run_id": "r1", "key": "k1", "flow_run_id": None, "dataset_version": "v", "created_at": "t", "success": True,
                 "report_dir": str(old / "reports" / "validation" / "r1"),
                 "data_docs_page": (old / "reports" / "gx" / "validations" / "r1.html").as_uri()}
    catalog.validation_index.write_text(json.dumps({"runs": [old_entry]}))
    entry = latest_report(home)
    assert entry["report_dir"] == str(report_dir) and entry["data_docs_page"] == page.as_uri()

    model = catalog.model_dir("v-run1")
    model.mkdir(parents=True)
    for name in ("model.safetensors", "vocab.json", "config.json"):
        (model / name).write_text("{}")
    old_record = {"time": "t", "run_id": "v-run1", "model_dir": str(old / "models" / "v-run1"), "metric": "bleu",
                  "promoted": False, "reason": "r", "forced": False, "challenger_metrics": {"bleu": 1.0},
                  "champion_before": None, "champion_metrics": None}
    catalog.registry_path.write_text(json.dumps({"champion": None, "champion_metrics": None, "history": [old_record]}))
    record = force_promote("v-run1", home)
    assert record["model_dir"] == str(model.resolve())  # shown under the current home
    assert read_registry(home)["history"][-1]["model_dir"] == "models/v-run1"  # recorded relative


# --------------------------------------------------------------------------- a home copied elsewhere, end to end

COUPLET = [sys.executable, "-m", "couplet"]
BINARY = {".parquet", ".safetensors", ".pt", ".npz", ".png", ".gz"}


def couplet(home: Path, prefect_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COUPLET_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([*COUPLET, *args], env=env, capture_output=True, text=True, timeout=300, cwd=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def files_naming(root: Path, text: str) -> list[str]:
    """The non-binary files under `root` (Prefect's own .prefect/ aside) whose bytes contain `text`."""
    needle = text.encode()
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and p.suffix not in BINARY and ".prefect" not in p.relative_to(root).parts and needle in p.read_bytes()]


@pytest.mark.slow
def test_a_home_copied_elsewhere_is_all_cached_and_answers(tmp_path, prefect_home, trained_home):
    # trained_home: `couplet run` wrote home `a` from `source`, then both moved away (a copy kept for other tests)
    first, a, source = trained_home.summary, trained_home.written_at, trained_home.source
    run_args = ["run", "--source", str(source), *TINY_RUN, "--json"]
    assert {v["status"] for v in first["stages"].values()} == {"completed"}
    assert first["promotion"]["promoted"] and Path(first["model"]).parent == a / "models"
    run_id = Path(first["model"]).name
    kept = trained_home.home
    assert json.loads((kept / "models" / run_id / "train.json").read_text())["model"] == f"models/{run_id}"  # recorded relative
    assert (kept / "models" / run_id / "phrases.parquet").is_file()  # the train stage's phrase memory
    assert json.loads((kept / "models" / run_id / "tuning.json").read_text())["tuned"]  # evaluate chose weights on valid

    b = tmp_path / "home-b"
    shutil.copytree(kept, b, symlinks=True)
    assert not a.exists() and not source.exists()  # the home was moved: nothing is left where it was written
    # the drop is gone too: ingest finds the copy the home keeps in its raw layer
    rerun = couplet(b, prefect_home, *run_args)
    assert f"source not found: {source}; using the copy this home ingested" in rerun.stderr, rerun.stderr[-2000:]
    again = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert {k: v["status"] for k, v in again["stages"].items()} == {k: "cached" for k in first["stages"]}
    assert again["promotion"]["champion"] == run_id
    # what people see names the copy
    for shown in (again["report"], again["build_dir"], again["model"], again["promotion"]["model_dir"]):
        assert Path(shown).is_relative_to(b) and Path(shown).exists(), shown
    assert again["data_docs"].startswith(b.as_uri() + "/")

    answer = json.loads(couplet(b, prefect_home, "match", "春风花月", "--json").stdout)
    assert answer["model"] == run_id and len(answer["candidates"][0]["lower"]) == 4  # the champion, from the copy

    report = couplet(b, prefect_home, "report").stdout
    shown = dict(line.split(None, 1) for line in report.splitlines() if line.startswith(("report ", "data ")))
    assert Path(shown["report"].strip()).is_relative_to(b) and Path(shown["report"].strip()).is_file(), report
    assert shown["data"].split()[-1].startswith(b.as_uri() + "/"), report
    entry = json.loads(couplet(b, prefect_home, "report", "--json").stdout)
    assert Path(entry["report_dir"]).is_relative_to(b) and (Path(entry["report_dir"]) / "report.md").is_file()

    assert files_naming(b, str(a)) == []
    assert files_naming(b, str(kept)) == []
    assert files_naming(b, str(b)) == []  # nor the copy's own path: records are relative, not rewritten
