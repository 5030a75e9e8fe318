"""The lower-line LM in the pipeline: the train stage writes it, evaluate records the decoding settings it
scored with, and a model folder answers with them (beam search with the LM fused when decode.lm_weight > 0)."""

from __future__ import annotations

import json

import pytest
from modelkit import save_tiny_model
from shardkit import make_build_dir

from couplet.core.catalog import MODEL_FILES
from couplet.core.config import Config, replace
from couplet.evaluation.evaluate import ablation, evaluate_pairs, run_evaluate
from couplet.decoding.beam import beam_decode
from couplet.decoding.constraints import CONSTRAINED
from couplet.decoding.decode import decode
from couplet.decoding.lm import CharBigramLM
from couplet.decoding.settings import DecodeSettings, search
from couplet.modelling.model import load_labeller
from couplet.predictor import Predictor
from couplet.modelling.train import fit_lower_line_lm
from couplet.data.vocab import Vocab

TRAIN = [("晚风摇树", "晨露润花"), ("春来江水", "秋至海山"), ("山高月小", "水落石出"), ("一帆风顺", "万事如意")] * 3
TEST = [("春来风顺", "月小风清"), ("春风得意", "秋水无痕")]


@pytest.fixture
def folder(tmp_path):
    """A refine-kind model folder with its LM, as the train stage leaves it."""
    build = make_build_dir(tmp_path, TRAIN, valid_pairs=TEST, test_pairs=TEST)
    vocab = Vocab.load(build / "vocab.json")
    config = replace(Config(), "model", kind="refine", embed_dim=16, n_blocks=1, refine_blocks=1)
    model_dir = tmp_path / "home" / "models" / "run-1"
    save_tiny_model(model_dir, config, vocab)
    fit_lower_line_lm(build, model_dir)
    return build, model_dir, config


def test_train_stage_lm_is_fitted_on_the_train_lower_lines(folder):
    build, model_dir, _ = folder
    vocab = Vocab.load(model_dir / MODEL_FILES.vocab)
    lm = CharBigramLM.load(model_dir / MODEL_FILES.lm, vocab_size=len(vocab))
    assert lm.line_log_prob("水落石出", vocab) > lm.line_log_prob("出石落水", vocab)


def test_evaluate_records_its_decoding_and_the_folder_answers_with_it(folder, tmp_path):
    build, model_dir, config = folder
    fused = replace(replace(config, "decode", lm_weight=0.5, beam_size=4), "evaluate", tune_decode=False)
    trained = {"key": "train-key", "model": str(model_dir), "run_id": "run-1"}
    run_evaluate(trained, {"build_dir": str(build)}, fused, tmp_path / "home")
    assert json.loads((model_dir / MODEL_FILES.decode).read_text())["lm_weight"] == 0.5
    assert json.loads((model_dir / MODEL_FILES.config).read_text())["decode"]["lm_weight"] == 0.0  # train's, untouched

    predictor = Predictor.load(model_dir)
    assert predictor.decoding.config.lm_weight == 0.5 and predictor.decoding.fused
    assert predictor.config.decode == predictor.decoding.config  # one section, wherever it is read
    answer = predictor.match("春来风顺", top_k=3)
    assert len(answer.candidates) == 3 and all(len(c.lower) == 4 for c in answer.candidates)
    plain = Predictor(predictor.model, predictor.vocab, replace(predictor.config, "decode", lm_weight=0.0))
    lp = predictor.log_probs(["春来风顺"])[0]
    # the fused score is the model's plus lm_weight times the LM's: recompute it for the best line
    best = answer.candidates[0]
    model_score = sum(float(lp[i, predictor.vocab.stoi[ch]]) for i, ch in enumerate(best.lower))
    assert best.score == pytest.approx(model_score + 0.5 * predictor.decoding.lm.line_log_prob(best.lower, predictor.vocab), abs=1e-4)
    assert plain.match("春来风顺").candidates[0].score == pytest.approx(
        sum(float(lp[i, predictor.vocab.stoi[ch]]) for i, ch in enumerate(plain.match("春来风顺").best)), abs=1e-4)


def test_lm_weight_without_an_lm_is_a_one_line_error(folder):
    _, model_dir, _ = folder
    (model_dir / MODEL_FILES.lm).unlink()
    (model_dir / MODEL_FILES.decode).write_text(json.dumps({"lm_weight": 0.3}))
    with pytest.raises(ValueError, match=r"decode\.lm_weight is 0\.3 but .*lm\.npz is missing") as info:
        Predictor.load(model_dir)
    assert "\n" not in str(info.value)
    for damaged in ("{not json", "[0.3]"):
        (model_dir / MODEL_FILES.decode).write_text(damaged)
        with pytest.raises(ValueError, match=r"decode\.json is damaged"):
            Predictor.load(model_dir)
    _, _, trained = load_labeller(model_dir)  # the weights' loader leaves decode.json to read_decode_settings
    assert trained.decode.lm_weight == 0.0


def test_match_evaluate_and_the_ablation_decode_through_the_folders_settings(folder):
    _, model_dir, config = folder
    (model_dir / MODEL_FILES.decode).write_text(json.dumps({"lm_weight": 0.5, "beam_size": 4, "dropped_since": 1}))
    predictor = Predictor.load(model_dir)
    settings = predictor.decoding
    assert settings.fused and settings.config.beam_size == 4 and settings.config.constrained == config.decode.constrained
    lp = predictor.log_probs(["春来风顺"])[0]
    fused = beam_decode("春来风顺", lp, predictor.vocab, top_k=2, lm=settings.lm, lm_weight=0.5, beam_size=4)
    assert search("春来风顺", lp, predictor.vocab, settings, top_k=2) == fused
    exact = DecodeSettings(settings.config)  # no LM: the exact search, whatever lm_weight says
    assert search("春来风顺", lp, predictor.vocab, exact, top_k=2) == decode("春来风顺", lp, predictor.vocab, top_k=2)
    assert predictor.match("春来风顺", top_k=2).candidates[0].score == fused.candidates[0][1]

    uppers, references = [u for u, _ in TEST], [d for _, d in TEST]
    metrics, predictions = evaluate_pairs(predictor, uppers, references)
    assert predictions == [predictor.match(u, allow_unknown=True).best for u in uppers]
    [row] = ablation(predictor, uppers, references, variants=[("constrained", CONSTRAINED)])
    assert {key: row[key] for key in ("bleu", "char_accuracy", "exact_match")} == \
        {key: metrics[key] for key in ("bleu", "char_accuracy", "exact_match")}


def test_evaluate_chooses_the_phrase_weights_on_valid_and_scores_the_phrase_baseline(folder, tmp_path):
    build, model_dir, config = folder
    config = replace(config, "evaluate", tune_rows=50)
    trained = {"key": "train-key", "model": str(model_dir), "run_id": "run-1"}
    assert not (model_dir / MODEL_FILES.phrases).exists()  # a folder trained before the memory: evaluate fits it
    result = run_evaluate(trained, {"build_dir": str(build)}, config, tmp_path / "home")
    assert (model_dir / MODEL_FILES.phrases).is_file()
    tuning = json.loads((model_dir / MODEL_FILES.tuning).read_text())
    assert tuning["tuned"] and tuning["n_valid"] == len(TEST) and len(tuning["grid"]) == 18
    best = max(tuning["grid"], key=lambda r: (round(r["ideograph_accuracy"], 6), r["bleu"]))
    decoded = json.loads((model_dir / MODEL_FILES.decode).read_text())
    assert {k: decoded[k] for k in ("phrase_uni", "phrase_bi", "phrase_tri")} == tuning["chosen"] == \
        {k: best[k] for k in ("phrase_uni", "phrase_bi", "phrase_tri")}
    metrics = json.loads((model_dir / MODEL_FILES.metrics).read_text())
    assert metrics["test"]["baseline"] == "phrase-table baseline"
    assert metrics["test"]["baseline_ideograph_accuracy"] == metrics["test_baseline"]["ideograph_accuracy"]
    assert metrics["test_baseline"]["model"] == "phrase-baseline" and metrics["test_dictionary"]["model"] == "dictionary-baseline"
    assert result["beats_baseline"] == (metrics["test"]["ideograph_accuracy"] > metrics["test_baseline"]["ideograph_accuracy"] + 1e-9)
    samples = (model_dir / MODEL_FILES.samples).read_text()
    assert "phrase-table baseline" in samples and "Fusion weights chosen on 2 valid couplets" in samples
    # a model with the direction marker is also scored the other way on the same pairs
    assert config.model.directions == 2 and metrics["test_reverse"]["direction"] == "up"
    assert metrics["test"]["reverse_ideograph_accuracy"] == metrics["test_reverse"]["ideograph_accuracy"]
    assert metrics["test_reverse"]["n_test"] == len(TEST) and "model, reverse (lower → upper)" in samples
    predictor = Predictor.load(model_dir)  # answers as scored: with the memory when a chosen weight is > 0
    assert (predictor.decoding.phrases is not None) == any(v > 0 for v in tuning["chosen"].values())


def test_phrase_weights_without_the_memory_are_a_one_line_error(folder):
    _, model_dir, _ = folder
    (model_dir / MODEL_FILES.decode).write_text(json.dumps({"phrase_bi": 0.5}))
    with pytest.raises(ValueError, match=r"decode\.phrase_bi=0\.5 but .*phrases\.parquet is missing") as info:
        Predictor.load(model_dir)
    assert "\n" not in str(info.value)
