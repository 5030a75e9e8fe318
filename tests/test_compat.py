"""A home written by an older couplet (tests/fixtures/home_9809833/, commit 9809833) still works with this one:
its model folder loads and answers as it did, its checkpoint resumes, and its registry names the same champion."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from couplet import registry
from couplet.core.catalog import MODEL_FILES
from couplet.core.config import replace
from couplet.decoding.settings import read_decode_settings
from couplet.modelling.checkpoint import load_checkpoint, run_fingerprint
from couplet.modelling.model import load_labeller
from couplet.predictor import Predictor

FIXTURES = Path(__file__).parent / "fixtures"
OLD_HOME = FIXTURES / "home_9809833"
ANSWERS = json.loads((OLD_HOME / "answers.json").read_text(encoding="utf-8"))
CHECKPOINT_STEP = 10  # the old run's last checkpoint: it took 12 steps and checkpointed every 5


def _generator():
    """tests/fixtures/make_home_9809833.py, for the couplets it trained on (importing it imports no couplet code)."""
    spec = importlib.util.spec_from_file_location("make_home_9809833", FIXTURES / "make_home_9809833.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def old_home(tmp_path) -> Path:
    """A copy of the old home, so that nothing a test writes reaches the fixture."""
    return Path(shutil.copytree(OLD_HOME, tmp_path / "home"))


@pytest.fixture
def old_model(old_home) -> Path:
    return old_home / "models" / ANSWERS["run_id"]


def test_the_old_folder_loads_with_the_settings_it_was_written_with(old_model):
    model, vocab, config = load_labeller(old_model)
    assert type(model).kind == config.model.kind == "attention" and len(vocab) == 61
    assert (config.model.embed_dim, config.train.max_steps, config.train.cpu_bf16) == (8, 12, False)
    settings = read_decode_settings(old_model, config.decode, len(vocab))  # config.json's decode section + decode.json
    assert (settings.config.lm_weight, settings.config.beam_size, settings.fused) == (0.5, 4, True)  # lm.npz fused in


def test_the_old_folder_answers_as_the_old_version_did(old_model):
    predictor = Predictor.load(old_model)
    for upper, expected in ANSWERS["answers"].items():
        got = [(c.lower, c.score) for c in predictor.match(upper, top_k=ANSWERS["top_k"]).candidates]
        assert [lower for lower, _ in got] == [lower for lower, _ in expected], upper
        assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-5), upper


def test_the_old_registry_names_the_same_champion(old_home, old_model):
    assert registry.read_registry(old_home)["champion"] == ANSWERS["champion"] == old_model.name
    assert registry.champion_dir(old_home, strict=True) == old_model


def test_the_old_checkpoint_passes_the_resume_check(old_model):
    _, vocab, config = load_labeller(old_model)
    path = old_model / MODEL_FILES.checkpoint
    fingerprint = run_fingerprint(config, len(vocab), ANSWERS["build_key"])
    ckpt = load_checkpoint(path, fingerprint)
    assert ckpt is not None and ckpt["progress"]["step"] == CHECKPOINT_STEP
    longer = replace(config, "train", max_steps=20, patience=5, num_threads=2)  # fields declared "may change"
    assert load_checkpoint(path, run_fingerprint(longer, len(vocab), ANSWERS["build_key"])) is not None
    assert load_checkpoint(path, run_fingerprint(replace(config, "train", lr=0.1), len(vocab), ANSWERS["build_key"])) is None


def test_the_old_checkpoint_resumes_a_longer_run(old_model, tmp_path, one_torch_thread):
    from couplet.modelling.train import train_labeller
    from shardkit import make_build_dir

    gen = _generator()
    build = make_build_dir(tmp_path, gen.PAIRS, valid_pairs=gen.VALID, test_pairs=gen.VALID)
    assert json.loads((build / "manifest.json").read_text(encoding="utf-8"))["key"] == ANSWERS["build_key"]
    _, _, config = load_labeller(old_model)
    before = torch.load(old_model / MODEL_FILES.checkpoint, weights_only=True)["model"]
    summary = train_labeller(build, replace(config, "train", max_steps=15), old_model, progress=False)
    assert summary["resumed_from"] == CHECKPOINT_STEP and summary["steps"] == 15
    after = torch.load(old_model / MODEL_FILES.checkpoint, weights_only=True)
    assert after["progress"]["step"] == 15
    assert any(not torch.equal(before[k], after["model"][k]) for k in before)  # it trained on from the old state
