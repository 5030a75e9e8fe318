"""The stage contract: code versions derived from the source, and run_cached's reuse rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import couplet
from couplet.core.catalog import STAGES
from couplet.core.stage import code_version, damaged_output, module_closure, read_stage_manifest, run_cached

PACKAGE = Path(couplet.__file__).resolve().parent


@pytest.fixture()
def package_copy(tmp_path) -> Path:
    root = tmp_path / "couplet"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def versions(root: Path) -> dict[str, str]:
    return {stage: code_version(stage, root) for stage in STAGES}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path.name}: update this test to the module's current source"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {stage for stage in STAGES if before[stage] != after[stage]}


def test_copy_has_the_same_versions_as_the_package(package_copy):
    assert versions(package_copy) == versions(PACKAGE)


def test_editing_the_model_invalidates_train_and_evaluate_only(package_copy):
    before = versions(package_copy)
    edit(package_copy / "modelling" / "model.py", "class GatedConvBlock", "GATE_SCALE = 2.0\n\n\nclass GatedConvBlock")
    assert changed(before, versions(package_copy)) == {"train", "evaluate"}


def test_editing_the_decoder_invalidates_evaluate_only(package_copy):
    before = versions(package_copy)
    edit(package_copy / "decoding" / "decode.py", "from __future__ import annotations", "from __future__ import annotations\nBEAM = 4")
    assert changed(before, versions(package_copy)) == {"evaluate"}


def test_editing_a_validation_rule_invalidates_validate(package_copy):
    before = versions(package_copy)
    edit(package_copy / "data" / "validate.py", '"up_differs_from_down")', '"up_differs_from_down", "extra_rule")')
    # the build runs validate.py's row rules on an extra source (couplet/data/extra.py), and train and evaluate read
    # builds through couplet/data/build.py: their code versions change too (their keys change anyway, through the
    # validate key the build hashes)
    assert changed(before, versions(package_copy)) == {"validate", "build", "train", "evaluate"}


def test_editing_the_trainer_invalidates_train(package_copy):
    before = versions(package_copy)
    edit(package_copy / "modelling" / "train.py", "def train_labeller(", "def _unused():\n    return 1\n\n\ndef train_labeller(")
    assert changed(before, versions(package_copy)) == {"train"}


def test_comments_and_blank_lines_do_not_count(package_copy):
    before = versions(package_copy)
    edit(package_copy / "modelling" / "model.py", "class GatedConvBlock", "# a note for readers\n\n\nclass GatedConvBlock")
    edit(package_copy / "data" / "ingest.py", "def run_ingest(", "# why: nothing\ndef run_ingest(")
    assert versions(package_copy) == before


def test_closure_follows_imports_inside_functions(package_copy):
    edit(package_copy / "data" / "ingest.py", "def run_ingest(", "def _lazy():\n    from couplet.decoding import decode  # noqa\n\n\ndef run_ingest(")
    assert "couplet.decoding.decode" in module_closure("couplet.data.ingest", package_copy)
    assert "couplet.decoding.decode" not in module_closure("couplet.data.ingest", PACKAGE)


# --------------------------------------------------------------------------- run_cached


def _producer(calls: list, text: str = "hello"):
    def produce(folder: Path) -> dict:
        calls.append(folder)
        (folder / "out.txt").write_text(text, encoding="utf-8")
        return {"rows": 1}

    return produce


def test_second_run_is_cached_and_force_reruns(tmp_path):
    calls: list = []
    out = tmp_path / "data" / "processed" / "ingest" / "k1"
    first = run_cached("ingest", "k1", out, _producer(calls))
    assert first["status"] == "completed" and first["rows"] == 1 and first["stage"] == "ingest"
    assert first["outputs"] == {"out.txt": 5} and first["code_version"] == code_version("ingest")
    assert run_cached("ingest", "k1", out, _producer(calls))["status"] == "cached"
    assert len(calls) == 1
    assert run_cached("ingest", "k1", out, _producer(calls), force=True)["status"] == "completed"
    assert len(calls) == 2
    assert run_cached("ingest", "k2", out, _producer(calls))["status"] == "completed"  # another key
    assert len(calls) == 3


def test_damaged_or_missing_output_is_a_miss(tmp_path, caplog):
    calls: list = []
    out = tmp_path / "stage"
    run_cached("build", "k", out, _producer(calls))
    (out / "out.txt").write_text("hel", encoding="utf-8")  # cut short
    assert run_cached("build", "k", out, _producer(calls))["status"] == "completed"
    assert [r.getMessage() for r in caplog.records] == [
        f"build: the cached output in {out} is damaged (out.txt has 3 bytes, 5 recorded); rebuilding it"]
    assert (out / "out.txt").read_text(encoding="utf-8") == "hello"
    (out / "out.txt").unlink()
    assert run_cached("build", "k", out, _producer(calls))["status"] == "completed"
    assert len(calls) == 3


def test_same_size_edit_is_caught_by_the_hash(tmp_path, caplog):
    calls: list = []
    out = tmp_path / "stage"
    first = run_cached("build", "k", out, _producer(calls))
    assert set(first["hashes"]) == {"out.txt"}
    (out / "out.txt").write_text("jello", encoding="utf-8")  # same size, other bytes
    assert run_cached("build", "k", out, _producer(calls))["status"] == "completed"
    assert "out.txt does not match its recorded SHA-256" in caplog.records[-1].getMessage()
    assert (out / "out.txt").read_text(encoding="utf-8") == "hello"


def test_unreadable_parquet_footer_is_a_miss(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def produce(folder: Path) -> dict:
        pq.write_table(pa.table({"x": list(range(100))}), folder / "t.parquet")
        return {}

    out = tmp_path / "stage"
    manifest = run_cached("build", "k", out, produce)
    data = bytearray((out / "t.parquet").read_bytes())
    data[-8:-4] = b"\xff\xff\xff\x7f"  # footer length out of range; size unchanged
    (out / "t.parquet").write_bytes(bytes(data))
    assert damaged_output(out, manifest).startswith("t.parquet: unreadable Parquet footer")
    assert run_cached("build", "k", out, produce)["status"] == "completed"
    assert pq.read_table(out / "t.parquet").num_rows == 100


def test_manifest_without_hashes_still_reuses(tmp_path):
    calls: list = []
    out = tmp_path / "stage"
    manifest = run_cached("build", "k", out, _producer(calls))
    manifest.pop("hashes")
    for field in ("status", "seconds"):
        manifest.pop(field)
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")  # as an older version wrote it
    assert run_cached("build", "k", out, _producer(calls))["status"] == "cached"


def test_stage_manifest_errors_are_one_line_naming_the_file(tmp_path):
    out = tmp_path / "stage"
    out.mkdir()
    with pytest.raises(FileNotFoundError) as missing:
        read_stage_manifest(out)
    assert str(missing.value) == f"{out}: no manifest.json (not a finished stage folder)"
    for text, why in (('{"key": "k", "outp', "is unreadable: "), ("[1, 2]", "is not a stage manifest")):
        (out / "manifest.json").write_text(text, encoding="utf-8")
        with pytest.raises(ValueError) as bad:
            read_stage_manifest(out)
        assert str(bad.value).startswith(f"{out / 'manifest.json'} {why}") and "\n" not in str(bad.value)
    calls: list = []
    assert run_cached("build", "k", out, _producer(calls))["status"] == "completed"  # an unreadable manifest: the stage runs
    assert read_stage_manifest(out)["key"] == "k"


def test_disk_full_is_one_line_and_leaves_the_cached_version(tmp_path):
    import errno

    from couplet.core.stage import DiskFull

    out = tmp_path / "data" / "processed" / "build" / "k"
    run_cached("build", "k", out, _producer([]))

    def produce(folder: Path) -> dict:
        (folder / "out.txt").write_text("half", encoding="utf-8")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull) as info:
        run_cached("build", "k", out, produce, force=True)
    assert str(info.value) == (f"build: no space left on the device of {out.parent} (writing a temporary folder; "
                               "the cached outputs are untouched); free some space and run again")
    assert (out / "out.txt").read_text(encoding="utf-8") == "hello"
    assert [p.name for p in out.parent.iterdir()] == ["k"]


def test_a_failing_stage_leaves_nothing_behind(tmp_path):
    out = tmp_path / "data" / "processed" / "validate" / "k"

    def produce(folder: Path) -> dict:
        (folder / "half.parquet").write_bytes(b"PAR1")
        raise RuntimeError("validation failed: no rows")

    with pytest.raises(RuntimeError, match="no rows"):
        run_cached("validate", "k", out, produce)
    assert not (tmp_path / "data" / "processed" / "validate").exists()


def test_in_place_stage_writes_its_marker_last_and_keeps_other_files(tmp_path):
    model_dir = tmp_path / "models" / "run"
    model_dir.mkdir(parents=True)
    (model_dir / "checkpoints").mkdir()
    seen = {}

    def produce(folder: Path) -> dict:
        assert folder == model_dir
        seen["marker_during_produce"] = (folder / "train.json").exists()
        (folder / "model.safetensors").write_bytes(b"weights")
        return {"run_id": "run"}

    (model_dir / "train.json").write_text('{"key": "old"}', encoding="utf-8")
    result = run_cached("train", "new", model_dir, produce, manifest_name="train.json", outputs=("model.safetensors",), in_place=True)
    assert result["status"] == "completed" and seen["marker_during_produce"] is False
    assert (model_dir / "checkpoints").is_dir()
    assert run_cached("train", "new", model_dir, produce, manifest_name="train.json", outputs=("model.safetensors",),
                      in_place=True)["status"] == "cached"


def test_unknown_stage_has_no_code_version():
    with pytest.raises(ValueError, match="unknown stage"):
        code_version("deploy")
