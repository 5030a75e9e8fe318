"""Champion/challenger rule and registry.json (couplet.registry): no Prefect, no model training."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from couplet import registry
from couplet.registry import Decision, champion_dir, decide_promotion, promote


def metrics(bleu: float, exact: float = 0.1, char: float = 0.5, fp: str | None = "split-a", **extra) -> dict:
    out = {"bleu": bleu, "exact_match": exact, "char_accuracy": char, "n": 40, **extra}
    if fp is not None:
        out["test_fingerprint"] = fp
    return out


def make_model(home: Path, run_id: str) -> Path:
    path = home / "models" / run_id
    path.mkdir(parents=True)
    for name in ("model.safetensors", "vocab.json", "config.json"):
        (path / name).write_text("{}")
    return path


# --------------------------------------------------------------------------- the rule


def test_no_champion_promotes():
    d = decide_promotion(metrics(1.0), None)
    assert d == Decision(True, d.reason) and "no champion" in d.reason


def test_better_metric_promotes_worse_keeps():
    assert decide_promotion(metrics(21.0), metrics(20.0)).promote
    worse = decide_promotion(metrics(19.0, exact=0.9), metrics(20.0, exact=0.1))
    assert not worse.promote and "bleu 19 < champion's 20" in worse.reason


def test_exact_match_breaks_a_bleu_tie_then_char_accuracy():
    assert decide_promotion(metrics(20.0, exact=0.2), metrics(20.0, exact=0.1)).promote
    lost = decide_promotion(metrics(20.0, exact=0.1), metrics(20.0, exact=0.2))
    assert not lost.promote and "exact_match" in lost.reason and "bleu tied" in lost.reason
    assert decide_promotion(metrics(20.0, char=0.6), metrics(20.0, char=0.5)).promote


def test_full_tie_keeps_the_champion():
    d = decide_promotion(metrics(20.0), metrics(20.0))
    assert not d.promote and "ties" in d.reason


def test_configured_metric():
    challenger, champion = metrics(10.0, exact=0.3), metrics(20.0, exact=0.2)
    assert not decide_promotion(challenger, champion, "bleu").promote
    assert decide_promotion(challenger, champion, "exact_match").promote
    with pytest.raises(ValueError, match="promote.metric must be one of"):
        decide_promotion(challenger, champion, "copy_rate")
    with pytest.raises(ValueError, match="not 'blue'"):
        registry.check_metric("blue")
    with pytest.raises(ValueError, match="no numeric 'bleu'"):
        decide_promotion({"exact_match": 1.0}, None)
    with pytest.raises(ValueError, match="no numeric 'bleu'"):
        decide_promotion(metrics(float("nan")), None)


def test_different_test_split_is_not_comparable():
    d = decide_promotion(metrics(99.0, fp="split-b"), metrics(1.0, fp="split-a"))
    assert not d.promote
    assert "not comparable" in d.reason and "split-b" in d.reason and "--force" in d.reason
    # one side without a fingerprint cannot be shown to be on the same split either
    assert not decide_promotion(metrics(99.0), metrics(1.0, fp=None)).promote
    # neither has one: compared as they are
    assert decide_promotion(metrics(2.0, fp=None), metrics(1.0, fp=None)).promote


def test_a_model_that_does_not_beat_the_baseline_is_not_promoted():
    below = metrics(30.0, ideograph_accuracy=0.07, baseline_ideograph_accuracy=0.08, beats_baseline=False)
    d = decide_promotion(below, None)
    assert not d.promote and "does not beat the dictionary baseline" in d.reason and "0.07 <= 0.08" in d.reason
    assert "--force" in d.reason
    assert not decide_promotion(below, metrics(1.0)).promote  # however weak the champion
    assert decide_promotion(below, None, require_baseline=False).promote  # promote.require_baseline=false
    above = metrics(30.0, ideograph_accuracy=0.09, baseline_ideograph_accuracy=0.08, beats_baseline=True)
    assert decide_promotion(above, None).promote
    assert decide_promotion(metrics(30.0), None).promote  # metrics from before the baseline: the old rule


def test_promote_records_the_baseline_and_force_still_works(tmp_path):
    home = tmp_path
    a = make_model(home, "run-a")
    below = metrics(30.0, ideograph_accuracy=0.07, baseline_ideograph_accuracy=0.08, beats_baseline=False)
    base = {"ideograph_accuracy": 0.08, "char_accuracy": 0.081, "bleu": 0.3, "references": {"length_match": 1.0}}
    record = promote(a, below, home, baseline_metrics=base)
    assert not record["promoted"] and record["champion"] is None
    assert record["baseline_metrics"] == {"ideograph_accuracy": 0.08, "char_accuracy": 0.081, "bleu": 0.3}
    md = registry.decision_markdown(record)
    assert "dictionary baseline |" in md and "| ideograph_accuracy | 0.07 | - | 0.08 |" in md
    assert "| char_accuracy | 0.5 | - | 0.081 |" in md
    assert promote(a, below, home, baseline_metrics=base)["status"] == "cached"
    lifted = promote(a, below, home, baseline_metrics=base, require_baseline=False)  # another rule: decided again
    assert lifted["status"] == "completed" and lifted["promoted"]
    b = make_model(home, "run-b")
    assert not promote(b, below, home)["promoted"]
    forced = registry.force_promote("run-b", home)
    assert forced["promoted"] and registry.read_registry(home)["champion"] == "run-b"


def _build_dir(root: Path, test_pairs: list[tuple[str, str]], train_rows: int) -> Path:
    """The parts of a build folder the fingerprint reads: manifest.json and the test shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    shards = [{"split": "train", "length": 2, "rows": train_rows, "path": "train/len-02.parquet", "sha256": "x"}]
    for length in sorted({len(up) for up, _ in test_pairs}):
        rows = [(up, down) for up, down in test_pairs if len(up) == length]
        path = f"test/len-{length:02d}.parquet"
        (root / "test").mkdir(exist_ok=True)
        ids = pa.array([[train_rows] * length] * len(rows), pa.list_(pa.int32()))  # ids depend on the vocabulary
        pq.write_table(pa.table({"up": [u for u, _ in rows], "down": [d for _, d in rows], "up_ids": ids}), root / path)
        shards.append({"split": "test", "length": length, "rows": len(rows), "path": path, "sha256": "x"})
    (root / "manifest.json").write_text(json.dumps({"shards": shards}))
    return root


def test_fingerprint_ignores_vocab_and_order_but_not_pairs_or_max_eval(tmp_path):
    test = [("天高", "地阔"), ("花红柳绿", "鸟语花香"), ("白日", "青山")]
    a = _build_dir(tmp_path / "a", test, train_rows=2)
    b = _build_dir(tmp_path / "b", test[::-1], train_rows=3)  # other train data and vocabulary ids
    c = _build_dir(tmp_path / "c", test[:2], train_rows=2)
    fp = registry.test_fingerprint
    assert fp(a) == fp(b) and len(fp(a)) == 16
    assert fp(a) != fp(c)
    assert fp(a) != fp(a, max_eval=1)


# --------------------------------------------------------------------------- registry.json


def test_promote_records_history_and_champion(tmp_path):
    home = tmp_path
    a, b, c = (make_model(home, r) for r in ("run-a", "run-b", "run-c"))
    assert champion_dir(home) is None

    first = promote(a, metrics(10.0, references={"n": 1}, decoding=["no_copy"]), home)
    assert first["promoted"] and first["champion"] == "run-a" and first["champion_before"] is None
    assert first["status"] == "completed"
    assert "references" not in first["challenger_metrics"] and "decoding" not in first["challenger_metrics"]

    worse = promote(b, metrics(5.0), home)
    assert not worse["promoted"] and worse["champion"] == "run-a"
    assert worse["champion_metrics"]["bleu"] == 10.0 and worse["challenger_metrics"]["bleu"] == 5.0

    better = promote(c, metrics(12.0), home)
    assert better["promoted"] and better["champion"] == "run-c" and better["champion_before"] == "run-a"

    data = json.loads((home / "models" / "registry.json").read_text())
    assert data["champion"] == "run-c" and data["champion_metrics"]["bleu"] == 12.0
    assert [r["run_id"] for r in data["history"]] == ["run-a", "run-b", "run-c"]
    assert all({"time", "reason", "challenger_metrics", "champion_metrics", "promoted"} <= r.keys() for r in data["history"])
    assert b.is_dir()  # a model that lost is kept
    assert champion_dir(home) == c
    assert registry.read_registry(home)["champion"] == "run-c"
    assert not list((home / "models").glob(".registry.json.tmp-*"))


def test_same_decision_again_is_cached(tmp_path):
    home = tmp_path
    a, b = make_model(home, "run-a"), make_model(home, "run-b")
    promote(a, metrics(10.0), home)
    promote(b, metrics(5.0), home)
    again_champion = promote(a, metrics(10.0), home)
    again_loser = promote(b, metrics(5.0), home)
    assert again_champion["status"] == again_loser["status"] == "cached"
    assert again_champion["champion"] == again_loser["champion"] == "run-a"
    assert len(registry.read_registry(home)["history"]) == 2
    # the champion scored on a new split keeps its place and takes the new scores
    rescored = promote(a, metrics(30.0, fp="split-b"), home)
    assert rescored["status"] == "completed" and rescored["champion"] == "run-a"
    assert registry.read_registry(home)["champion_metrics"]["test_fingerprint"] == "split-b"
    # the loser, now facing the re-scored champion, is decided again: different split
    third = promote(b, metrics(5.0), home)
    assert third["status"] == "completed" and not third["promoted"] and "not comparable" in third["reason"]


def test_force_promote_and_cli(tmp_path, monkeypatch):
    """`couplet champion set <run-id> --force` and `couplet champion show`."""
    from typer.testing import CliRunner

    import couplet.cli.registry  # noqa: F401  (registers `champion`)
    from couplet.cli import app

    def champion(*args: str):
        return CliRunner().invoke(app, ["champion", *args])

    home = tmp_path
    a, b = make_model(home, "run-a"), make_model(home, "run-b")
    promote(a, metrics(10.0), home)
    promote(b, metrics(50.0, fp="split-b"), home)
    assert registry.read_registry(home)["champion"] == "run-a"
    monkeypatch.setenv("COUPLET_HOME", str(home))
    r = champion("set", "run-b")  # without --force: refused, nothing written
    assert r.exit_code == 2 and "--force" in r.stderr
    assert registry.read_registry(home)["champion"] == "run-a"
    r = champion("set", "run-b", "--force", "--reason", "new data drop")
    assert r.exit_code == 0, r.output
    assert "champion is now run-b (was run-a)" in r.stdout
    data = registry.read_registry(home)
    assert data["champion"] == "run-b" and data["history"][-1]["forced"] and data["history"][-1]["reason"] == "new data drop"
    assert data["champion_metrics"]["test_fingerprint"] == "split-b"
    r = champion("show")
    assert r.exit_code == 0
    assert "champion run-b" in r.stdout
    make_model(home, "run-new")
    r = champion("set", "run-new", "--force")
    assert r.exit_code == 1
    assert "never evaluated" in r.stderr


def test_bad_inputs_are_clear_errors(tmp_path):
    home = tmp_path
    outside = tmp_path / "elsewhere" / "run-x"
    outside.mkdir(parents=True)
    with pytest.raises(registry.RegistryError, match="only models/<run-id>/ can be champion"):
        promote(outside, metrics(1.0), home)
    (home / "models" / "half").mkdir(parents=True)
    with pytest.raises(registry.RegistryError, match="not a model directory"):
        promote(home / "models" / "half", metrics(1.0), home)
    make_model(home, "run-a")
    (home / "models" / "registry.json").write_text("{not json")
    with pytest.raises(registry.RegistryError, match="cannot read .*registry.json"):
        promote(home / "models" / "run-a", metrics(1.0), home)
    assert (home / "models" / "registry.json").read_text() == "{not json"  # never overwritten


def test_champion_dir_none_when_folder_gone(tmp_path):
    a = make_model(tmp_path, "run-a")
    promote(a, metrics(1.0), tmp_path)
    (a / "model.safetensors").unlink()
    assert champion_dir(tmp_path) is None


def test_decision_markdown_lists_both_metric_sets(tmp_path):
    a, b = make_model(tmp_path, "run-a"), make_model(tmp_path, "run-b")
    promote(a, metrics(10.0), tmp_path)
    md = registry.decision_markdown(promote(b, metrics(5.0), tmp_path))
    assert "`run-b`: **not promoted**" in md and "bleu 5 < champion's 10" in md
    assert "| bleu | 5 | 10 |" in md and "| test_fingerprint | split-a | split-a |" in md


# --------------------------------------------------------------------------- two processes at once


def _promote_in_child(home: str, run_id: str, bleu: float, barrier) -> None:
    barrier.wait()
    promote(Path(home) / "models" / run_id, metrics(bleu), home, lock_timeout_s=30)


def test_concurrent_promotions_leave_one_valid_registry(tmp_path):
    scores = {"run-0": 3.0, "run-1": 9.0, "run-2": 1.0, "run-3": 7.0, "run-4": 9.5, "run-5": 2.0}
    for run_id in scores:
        make_model(tmp_path, run_id)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(scores))
    procs = [ctx.Process(target=_promote_in_child, args=(str(tmp_path), r, s, barrier)) for r, s in scores.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    data = json.loads((tmp_path / "models" / "registry.json").read_text())
    assert data["champion"] == "run-4"  # whatever the order, the best one ends as champion
    assert sorted(r["run_id"] for r in data["history"]) == sorted(scores)
    # each decision saw the champion left by the one before it (no lost update)
    champion = None
    for r in data["history"]:
        assert r["champion_before"] == champion
        champion = r["run_id"] if r["promoted"] else champion
    assert champion == "run-4"
