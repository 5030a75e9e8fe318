"""Predictor (input checks, batching), model-dir resolution, evaluation, and the match/evaluate CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from couplet.core.config import Config, DataConfig, ModelConfig
from couplet.decoding.constraints import ARGMAX
from couplet.evaluation.evaluate import (
    ABLATION_VARIANTS,
    ablation,
    ablation_markdown,
    evaluate_pairs,
    read_pair_files,
)
from couplet.evaluation.metrics import repetition_match
from couplet.predictor import (
    InputError,
    ModelNotFoundError,
    Predictor,
    resolve_model_dir,
)
from couplet.serving.schemas import match_payload
from couplet.data.vocab import PAD_TOKEN, UNK_TOKEN, Vocab
from modelkit import save_tiny_model

CHARS = "春风得意马蹄疾秋月扬辉犬吠声海阔凭鱼跃天高任鸟飞山水明清云雨花红柳绿日新年好万事如步"
MAX_LEN = 12


def _save_tiny_model(model_dir: Path, seed: int = 0) -> Path:
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *dict.fromkeys(CHARS), "，", "。"])
    config = Config(data=DataConfig(max_len=MAX_LEN), model=ModelConfig(kind="gated_cnn", embed_dim=16, n_blocks=2, word_features=False))
    return save_tiny_model(model_dir, config, vocab, seed=seed)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-run")


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.load(model_dir)


# --------------------------------------------------------------------------- input


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty input"),
        ("   \t ", "empty input"),
        ("春风abc", "Latin letters or digits: a, b, c"),
        ("春风12", "Latin letters or digits: 1, 2"),
        ("春" * (MAX_LEN + 1), f"at most {MAX_LEN}"),
        ("春风𠀀吹龘", "characters not in the model's vocabulary: 𠀀, 吹, 龘"),
    ],
)
def test_input_errors(predictor, text, message):
    with pytest.raises(InputError) as info:
        predictor.match(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_whitespace_is_removed(predictor):
    result = predictor.match(" 春 风 得 意 马 蹄 疾 \n")
    assert result.upper == "春风得意马蹄疾"
    assert predictor.match("春风得意马蹄疾").candidates == result.candidates


def test_ascii_punctuation_becomes_full_width(predictor):
    assert predictor.match("春风,明月").upper == "春风，明月"


def test_punctuation_outside_the_vocabulary_is_copied(predictor):
    assert "；" not in predictor.vocab.stoi
    result = predictor.match("春风；秋月", top_k=2)
    assert all(c.lower[2] == "；" and len(c.lower) == 5 for c in result.candidates)


def test_match_result(predictor, model_dir):
    result = predictor.match("春风得意马蹄疾", top_k=3, tone=True)
    assert result.model_id == model_dir.name
    assert len(result.candidates) == 3
    assert [c.score for c in result.candidates] == sorted((c.score for c in result.candidates), reverse=True)
    assert {"no_copy", "punctuation", "repetition"} <= set(result.constraints)
    for c in result.candidates:
        assert len(c.lower) == 7 and all(a != b for a, b in zip(c.lower, "春风得意马蹄疾"))
    d = match_payload(result)  # the one wire format (API and `couplet match --json`)
    assert set(d) == {"upper", "candidates", "constraints", "relaxed", "model", "direction", "alternatives"}
    assert json.loads(json.dumps(d, ensure_ascii=False)) == d
    plain = predictor.match("春风得意马蹄疾", constrained=False)
    assert plain.constraints == []


def test_repetition_kept(predictor):
    result = predictor.match("山山水水，年年", top_k=2)
    for c in result.candidates:
        assert repetition_match("山山水水，年年", c.lower) and c.lower[4] == "，"


def test_top_k_checked(predictor):
    with pytest.raises(InputError, match="top_k"):
        predictor.match("春风", top_k=0)


def test_match_batch_equals_match_and_keeps_order(predictor):
    lines = ["春风得意马蹄疾", "海阔凭鱼跃", "天高任鸟飞", "秋月扬辉", "山水", "春风得意马蹄疾"]
    batch = predictor.match_batch(lines, top_k=2, batch_size=2)
    for line, res in zip(lines, batch):
        single = predictor.match(line, top_k=2)
        assert res.upper == line
        assert [c.lower for c in res.candidates] == [c.lower for c in single.candidates]
        assert [c.score for c in res.candidates] == pytest.approx([c.score for c in single.candidates], abs=1e-4)


def test_match_batch_errors(predictor):
    with pytest.raises(InputError):
        predictor.match_batch(["春风", ""])
    out = predictor.match_batch(["春风", "", "xyz", "秋月"], errors="return")
    assert not isinstance(out[0], Exception) and not isinstance(out[3], Exception)
    assert isinstance(out[1], InputError) and isinstance(out[2], InputError)


def test_a_model_of_one_direction_refuses_the_other(tmp_path):
    vocab = Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *dict.fromkeys(CHARS), "，", "。"])
    config = Config(model=ModelConfig(kind="gated_cnn", embed_dim=16, n_blocks=2, directions=1, word_features=False))
    one_way = Predictor.load(save_tiny_model(tmp_path / "one-way", config, vocab))
    message = ("this model answers only upper → lower; retrain with model.directions=2 and train.swapped_pairs=true "
               "for the other direction")
    for ask in (lambda: one_way.match("春风", direction="up"), lambda: one_way.match_batch(["春风"], direction="up", errors="return")):
        with pytest.raises(InputError) as info:
            ask()
        assert str(info.value) == message
    assert one_way.match("春风", direction="down").best == one_way.match("春风").best


def test_a_model_of_two_directions_answers_both(predictor):
    up = predictor.match("春风", direction="up", constrained=False)
    assert len(up.best) == 2 and up.upper == "春风"
    assert predictor.match_batch(["春风", "秋月"], direction="up", constrained=False)[0].best == up.best


def test_allow_unknown_answers_rare_characters(predictor):
    res = predictor.match("春风吹龘", allow_unknown=True)
    assert len(res.best) == 4


# --------------------------------------------------------------------------- resolving the model dir


def test_resolve_explicit(model_dir, tmp_path):
    assert resolve_model_dir(str(model_dir)) == model_dir.resolve()
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model_dir(str(tmp_path / "empty"))


def test_resolve_newest_then_champion(tmp_path, monkeypatch):
    monkeypatch.setenv("COUPLET_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir(None)
    assert "no trained model found under" in str(info.value) and "couplet run --until train" in str(info.value)
    models = tmp_path / "models"
    old = _save_tiny_model(models / "run-old")
    new = _save_tiny_model(models / "run-new")
    os.utime(old / "model.safetensors", (time.time() - 100, time.time() - 100))
    (models / ".tmp-run-x").mkdir()
    assert resolve_model_dir(None) == new.resolve()
    (models / "registry.json").write_text(json.dumps({"champion": "run-old", "history": []}))
    assert resolve_model_dir(None) == old.resolve()
    (models / "registry.json").write_text(json.dumps({"champion": "run-gone"}))
    with pytest.raises(ModelNotFoundError, match="run-gone"):
        resolve_model_dir(None)
    (models / "registry.json").write_text(json.dumps({"champion": None}))
    assert resolve_model_dir(None) == new.resolve()


def test_resolve_with_an_unreadable_registry_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COUPLET_HOME", str(tmp_path))
    _save_tiny_model(tmp_path / "models" / "run-a")
    (tmp_path / "models" / "registry.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="cannot read") as info:
        resolve_model_dir(None)
    assert "registry.json" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- evaluation


def test_read_pair_files_tolerates_bom_crlf(tmp_path):
    (tmp_path / "in.txt").write_bytes("\ufeff春 风 得 意 \r\n海 阔 凭 鱼 跃 \r\n".encode("utf-8"))
    (tmp_path / "out.txt").write_bytes("秋 月 扬 辉 \n天 高 任 鸟 飞 \n".encode("utf-8"))
    uppers, refs = read_pair_files(tmp_path / "in.txt", tmp_path / "out.txt")
    assert uppers == ["春风得意", "海阔凭鱼跃"] and refs == ["秋月扬辉", "天高任鸟飞"]
    (tmp_path / "out.txt").write_text("秋 月 \n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_pair_files(tmp_path / "in.txt", tmp_path / "out.txt")
    assert "2 lines" in str(info.value) and "has 1" in str(info.value)


def test_evaluate_pairs_and_ablation(predictor):
    uppers = ["春风得意马蹄疾", "海阔凭鱼跃", "山山水水", "春风吹龘", ""]
    refs = ["秋月扬辉犬吠声", "天高任鸟飞", "日日年年", "秋月明清", "天"]
    metrics, preds = evaluate_pairs(predictor, uppers, refs, batch_size=2)
    assert len(preds) == 5 and preds[-1] == "" and metrics["n_unanswerable"] == 1
    assert len(preds[3]) == 4  # an unknown character is fed as UNK
    assert metrics["copy_rate"] == 0.0 and metrics["references"]["length_match"] == pytest.approx(0.8)
    rows = ablation(predictor, uppers[:3], refs[:3])
    assert [r["decoding"] for r in rows] == [name for name, _ in ABLATION_VARIANTS]
    assert rows[-2]["copy_rate"] == 0.0 and rows[-2]["repetition_match"] == 1.0
    by_name = {r["decoding"]: r for r in rows}
    assert by_name["constrained (default)"]["reuse_rate"] == by_name["+no-reuse"]["reuse_rate"] == 0.0
    assert "no_reuse" in by_name["constrained (default)"]["constraints"]
    argmax_preds = [predictor.match(u, options=ARGMAX).best for u in uppers[:3]]
    assert evaluate_pairs(predictor, uppers[:3], argmax_preds, constrained=False)[0]["exact_match"] == 1.0
    seed_metrics, _ = evaluate_pairs(predictor, uppers[:3], refs[:3], constrained=False)
    assert rows[0]["bleu"] == seed_metrics["bleu"] and rows[0]["copy_rate"] == seed_metrics["copy_rate"]
    table = ablation_markdown(rows)
    assert table.count("\n") == len(rows) + 3 and "argmax (seed)" in table and " reuse |" in table


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli():
    import couplet.cli.model  # noqa: F401  (registers match/evaluate)
    from couplet.cli import app

    runner = CliRunner()
    threads = torch.get_num_threads()  # the commands set torch's (process-wide) thread count
    yield lambda args, **kw: runner.invoke(app, args, **kw)
    torch.set_num_threads(threads)


def test_cli_match_once(cli, model_dir):
    r = cli(["match", "春风得意马蹄疾", "--model", str(model_dir)])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip()) == 7
    r = cli(["match", "春风得意马蹄疾", "--model", str(model_dir), "--top-k", "3"])
    assert r.exit_code == 0 and r.stdout.strip().splitlines()[2].lstrip().startswith("3.")
    r = cli(["match", "春风得意马蹄疾", "--model", str(model_dir), "--json", "--top-k", "2", "--tone"])
    obj = json.loads(r.stdout)
    assert obj["upper"] == "春风得意马蹄疾" and len(obj["candidates"]) == 2 and obj["model"] == model_dir.name
    assert set(obj["candidates"][0]) == {"lower", "score"} and "repetition" in obj["constraints"]
    r = cli(["match", "春风得意马蹄疾", "--model", str(model_dir), "--unconstrained", "--json"])
    assert json.loads(r.stdout)["constraints"] == []


def test_cli_match_bad_input_is_one_line_exit_2(cli, model_dir):
    r = cli(["match", "hello", "--model", str(model_dir)])
    assert r.exit_code == 2
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output
    r = cli(["match", "春风", "--model", str(model_dir / "missing")])
    assert r.exit_code == 2 and "not found" in r.stderr


def test_cli_match_no_model(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COUPLET_HOME", str(tmp_path))
    r = cli(["match", "春风"])
    assert r.exit_code == 2 and "no trained model found" in r.stderr


def test_cli_match_batch_from_stdin_and_file(cli, model_dir, tmp_path):
    text = "春 风 得 意 马 蹄 疾 \nabc\n海阔凭鱼跃\n\n"
    r = cli(["match", "--model", str(model_dir)], input=text)
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    assert len(out) == 4
    assert len(out[0]) == 7 and out[1].startswith("error:") and len(out[2]) == 5 and out[3].startswith("error:")
    r = cli(["match", "--model", str(model_dir), "--json"], input=text)
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert "candidates" in objs[0] and "Latin" in objs[1]["error"]
    path = tmp_path / "uppers.txt"
    path.write_text("春风得意马蹄疾\r\n天高任鸟飞\r\n", encoding="utf-8")
    r = cli(["match", "--model", str(model_dir), "--file", str(path), "--top-k", "2"])
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(len(line.split("\t")) == 2 for line in lines)


def test_cli_evaluate(cli, model_dir, tmp_path):
    (tmp_path / "in.txt").write_text("春 风 得 意 马 蹄 疾 \n海 阔 凭 鱼 跃 \n", encoding="utf-8")
    (tmp_path / "out.txt").write_text("秋 月 扬 辉 犬 吠 声 \n天 高 任 鸟 飞 \n", encoding="utf-8")
    preds = tmp_path / "pred" / "preds.txt"
    args = ["evaluate", "--model", str(model_dir), "--in", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out.txt")]
    r = cli([*args, "--json", "--predictions", str(preds)])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["n"] == 2 and "bleu" in metrics and "references" in metrics
    lines = preds.read_text(encoding="utf-8").splitlines()
    assert [len(line) for line in lines] == [7, 5]
    r = cli(args)
    assert r.exit_code == 0 and "char_accuracy" in r.stdout
    (tmp_path / "out.txt").write_text("秋 月 \n", encoding="utf-8")
    r = cli(args)
    assert r.exit_code == 2 and "has 2 lines" in r.stderr and "has 1" in r.stderr
    r = cli([*args[:4], str(tmp_path / "nope.txt"), *args[5:]])
    assert r.exit_code == 2 and "not found" in r.stderr


def test_no_reuse_is_the_default_and_a_folder_without_it_answers_as_before(predictor, model_dir, tmp_path):
    """不重字 on by default (`decode.no_reuse`); a folder whose config.json predates the field answers without it."""
    import shutil
    from dataclasses import replace as replace_options

    from couplet.decoding.constraints import CONSTRAINED

    line = "春风得意马蹄疾"
    assert predictor.decoding.config.no_reuse is True
    new = predictor.match(line, top_k=3)
    assert "no_reuse" in new.constraints and new.relaxed == []
    assert all(not set(c.lower) & set(line) for c in new.candidates)
    assert predictor.decode_options(constrained=False).no_reuse is False  # the seed's argmax stays the seed's

    old_dir = Path(shutil.copytree(model_dir, tmp_path / "old-run"))
    for name in ("config.json", "decode.json"):
        path = old_dir / name
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            section = saved.get("decode", saved) if name == "config.json" else saved
            section.pop("no_reuse", None)
            path.write_text(json.dumps(saved), encoding="utf-8")
    old = Predictor.load(old_dir)
    assert old.decoding.config.no_reuse is False
    answered = old.match(line, top_k=3)
    assert "no_reuse" not in answered.constraints
    without = predictor.match(line, top_k=3, options=replace_options(CONSTRAINED, no_reuse=False))
    assert [(c.lower, c.score) for c in answered.candidates] == [(c.lower, c.score) for c in without.candidates]
    metrics, _ = evaluate_pairs(old, [line], ["秋月扬辉犬吠声"])
    assert "no_reuse" not in metrics["decoding"]
    assert "no_reuse" in evaluate_pairs(predictor, [line], ["秋月扬辉犬吠声"])[0]["decoding"]
