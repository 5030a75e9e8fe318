"""Data loading, length-bucketed batches, and the trainer: outputs, determinism, resume, early stopping."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from couplet.core.catalog import PROBE_LINES as PROBES
from couplet.core.config import Config, replace
from couplet.data.batches import LengthBucketBatches, load_split
from couplet.modelling.loop import TrainingInterrupted
from couplet.modelling.model import load_labeller
from couplet.modelling.progress import argmax_lines
from couplet.modelling.train import train_labeller
from shardkit import make_build_dir

PAIRS = [
    ("晚风摇树树还挺", "晨露润花花更红"),
    ("今天天气不错", "明日风光更佳"),
    ("鱼跃此时海", "花开彼岸天"),
    ("只有香如故", "何须色更新"),
    ("春来江水绿", "秋至海山青"),
    ("一帆风顺", "万事如意"),
    ("山高月小", "水落石出"),
]
VALID = [("鱼跃此时海", "花开彼岸天"), ("一帆风顺", "万事如意")]


def small_config(**train) -> Config:
    config = replace(Config(), "model", embed_dim=32, n_blocks=2)
    return replace(config, "train", batch_size=4, lr=2e-2, num_threads=1, checkpoint_every=5, **train)


@pytest.fixture
def build(tmp_path):
    return make_build_dir(tmp_path, PAIRS, valid_pairs=VALID, test_pairs=VALID)


def test_load_split_groups_by_length(build):
    train = load_split(build, "train")
    assert sorted(train) == [4, 5, 6, 7]
    up, down = train[5]
    assert up.shape == (3, 5) and down.shape == (3, 5) and up.dtype == np.int64
    assert sorted(load_split(build, "train", max_len=5)) == [4, 5]
    assert sorted(load_split(build, "valid")) == [4, 5]


def test_batches_cover_an_epoch_with_one_length_each(build):
    batches = LengthBucketBatches(load_split(build, "train"), batch_size=2, seed=3)
    seen = []
    for up, down in batches:
        assert up.shape == down.shape and up.shape[0] == 2 and up.dtype == torch.int64
        seen += [tuple(row) for row in up.tolist()]
    assert len(seen) == 2 * len(batches) and batches.epoch == 1 and batches.position == 0
    train = load_split(build, "train")
    assert {tuple(r) for up, _ in train.values() for r in up.tolist()} == set(seen)


def test_batches_are_deterministic_and_resume_exactly(build):
    train = load_split(build, "train")

    def take(b, n):
        out = []
        while len(out) < n:
            out += [up.tolist() for up, _ in b]
        return out[:n]

    a = take(LengthBucketBatches(train, 2, seed=1), 9)
    assert a == take(LengthBucketBatches(train, 2, seed=1), 9)
    assert a != take(LengthBucketBatches(train, 2, seed=2), 9)
    first = LengthBucketBatches(train, 2, seed=1)
    it = iter(first)
    head = [next(it)[0].tolist() for _ in range(3)]
    resumed = LengthBucketBatches(train, 2, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 6) == a


def test_train_writes_a_complete_model_dir(build, tmp_path):
    out = tmp_path / "model"
    summary = train_labeller(build, small_config(epochs=15, patience=100), out, progress=False)
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "vocab.json", "config.json", "metrics.json", "curve.png", "samples.md", "checkpoints"}
    assert summary["model_dir"] == str(out) and summary["steps"] > 0 and summary["tokens_per_s"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == summary["steps"] == 15 * metrics["steps_per_epoch"]
    assert metrics["best_valid_loss"] == summary["best_valid_loss"] < 0.5
    assert all(len(point) == 3 for point in metrics["history"])
    samples = (out / "samples.md").read_text()
    assert all(line in samples for line in PROBES) and "epoch 1 " in samples and "final" in samples
    # the tiny model learns its training couplets exactly under the seed's argmax decoding
    model, vocab, config = load_labeller(out)
    ups, downs = zip(*PAIRS)
    assert argmax_lines(model, vocab, list(ups), "cpu") == list(downs)
    assert config.train.epochs == 15


def test_same_seed_same_weights_other_seed_differs(build, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_labeller(build, small_config(max_steps=8, seed=seed), tmp_path / name, progress=False)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_ends_where_an_uninterrupted_run_ends(build, tmp_path):
    config = small_config(max_steps=23, eval_every=4, patience=100)
    full = train_labeller(build, config, tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        train_labeller(build, config, tmp_path / "cut", progress=False, stop_after=13)  # last checkpoint: step 10
    assert (tmp_path / "cut" / "checkpoints" / "last.pt").is_file() and not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train_labeller(build, config, tmp_path / "cut", progress=False)
    assert resumed["resumed_from"] == 10 and resumed["steps"] == full["steps"] == 23
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut"))
    assert ma["best_step"] == mb["best_step"]
    assert len(ma["history"]) == len(mb["history"])
    for pa, pb in zip(ma["history"], mb["history"]):
        assert pa[0] == pb[0] and [v is None for v in pa] == [v is None for v in pb]
        assert [v for v in pa if v is not None] == pytest.approx([v for v in pb if v is not None], rel=1e-6)
    # the last checkpoint holds the final step, and an unchanged rerun has nothing left to train
    last = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert last["progress"]["step"] == 20


def test_checkpoint_with_another_config_is_ignored(build, tmp_path):
    with pytest.raises(TrainingInterrupted):
        train_labeller(build, small_config(max_steps=10), tmp_path / "m", progress=False, stop_after=6)
    other = replace(small_config(max_steps=10), "train", lr=1e-3)
    summary = train_labeller(build, other, tmp_path / "m", progress=False)
    assert summary["resumed_from"] is None and summary["steps"] == 10


def test_unusable_checkpoint_is_ignored_with_a_notice(build, tmp_path, caplog):
    config = small_config(max_steps=6)
    ckpt = tmp_path / "m" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="couplet.modelling.train"):
        summary = train_labeller(build, config, tmp_path / "m", progress=False)
    assert summary["resumed_from"] is None and summary["steps"] == 6
    assert f"ignoring {ckpt}: cannot read it" in caplog.text and len(caplog.records) == 1
    # same config, another layout (the optimiser state does not load, after the weights did): a fresh run again
    last = torch.load(ckpt, weights_only=True)
    last["optimizer"] = {"state": {}, "param_groups": []}
    other = tmp_path / "n" / "checkpoints" / "last.pt"
    other.parent.mkdir(parents=True)
    torch.save(last, other)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="couplet.modelling.train"):
        summary = train_labeller(build, config, tmp_path / "n", progress=False)
    assert summary["resumed_from"] is None and summary["steps"] == 6
    assert f"ignoring {other}: cannot resume from it" in caplog.text and len(caplog.records) == 1
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "n" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_keeps_the_best_weights(tmp_path):
    # valid pairs contradict the train pairs: the better the model fits train, the worse valid gets
    contradicting = [(up, down[::-1]) for up, down in PAIRS]
    build = make_build_dir(tmp_path, PAIRS, valid_pairs=contradicting)
    out = tmp_path / "m"
    summary = train_labeller(build, small_config(epochs=200, eval_every=2, patience=2), out, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] and summary["steps"] < 200 * metrics["steps_per_epoch"]
    valid = [v for _, _, v in metrics["history"] if v is not None]
    assert metrics["best_valid_loss"] == min(valid) and metrics["best_step"] < metrics["steps"]


def test_cpu_bf16_run_writes_a_model(build, tmp_path):
    summary = train_labeller(build, small_config(max_steps=6, cpu_bf16=True), tmp_path / "m", progress=False)
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert summary["steps"] == 6 and all(t.dtype == torch.float32 for t in weights.values())


def test_cli_prints_library_notices_as_plain_lines(capfd):
    import logging

    from couplet.cli import _console_notices

    logger = logging.getLogger("couplet")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers.clear()
    try:
        _console_notices()
        _console_notices()  # a second call adds no second handler
        logging.getLogger("couplet.modelling.train").info("resuming from %s at step %d", "last.pt", 40)
        assert capfd.readouterr().err == "resuming from last.pt at step 40\n"
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def test_cpu_bf16_auto_follows_the_cpu_and_forcing_it_warns(monkeypatch, caplog):
    import logging

    import couplet.modelling.step as step_mod

    monkeypatch.setattr(step_mod, "native_cpu_bf16", lambda: False)
    assert step_mod.resolve_cpu_bf16("auto") is False and step_mod.resolve_cpu_bf16(False) is False
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="couplet.modelling.train"):
        assert step_mod.resolve_cpu_bf16(True) is True
    (record,) = caplog.records
    assert "without native bf16" in record.getMessage() and "x slower than fp32" in record.getMessage()
    monkeypatch.setattr(step_mod, "native_cpu_bf16", lambda: True)
    assert step_mod.resolve_cpu_bf16("auto") is True


# --------------------------------------------------------------------------- schedule, weight average, budget


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from couplet.modelling.step import lr_factor

    tc = replace(Config(), "train", lr_schedule="cosine", warmup_steps=10).train
    factors = [lr_factor(tc, step, 110, 0.0) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[110] == pytest.approx(0.0, abs=1e-12)
    assert factors[60] == pytest.approx(0.5)
    timed = replace(Config(), "train", lr_schedule="cosine", warmup_steps=0, max_minutes=1.0).train  # the time budget counts as progress
    assert lr_factor(timed, 1, 10_000, 30.0) == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(replace(Config(), "train", lr_schedule="constant").train, 5, 10, 0.0) == 1.0


def test_warmup_is_at_most_a_tenth_of_a_short_run():
    from couplet.modelling.step import lr_factor

    tc = replace(Config(), "train", lr_schedule="cosine", warmup_steps=500).train
    assert lr_factor(tc, 0, 40, 0.0) == pytest.approx(0.25) and lr_factor(tc, 3, 40, 0.0) == pytest.approx(1.0)
    assert lr_factor(tc, 0, 100_000, 0.0) == pytest.approx(1 / 500)


def test_ema_decay_warms_up_to_its_setting():
    from couplet.modelling.step import ema_update

    update, current = ema_update(0.999), [torch.ones(2)]
    early = [torch.zeros(2)]
    update(early, current, torch.tensor(0))  # decay (1 + 0) / (10 + 0) = 0.1: the average follows the weights
    assert early[0].tolist() == pytest.approx([0.9, 0.9])
    late = [torch.zeros(2)]
    update(late, current, torch.tensor(100_000))  # long past the warm-up: the configured 0.999
    assert late[0].tolist() == pytest.approx([0.001, 0.001])


def test_refine_kind_with_cosine_and_ema_trains_resumes_and_loads(build, tmp_path):
    config = replace(small_config(max_steps=12, eval_every=4, patience=100, lr_schedule="cosine", warmup_steps=3,
                                  ema_decay=0.9), "model", kind="refine", refine_blocks=1, output="full")
    full = train_labeller(build, config, tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        train_labeller(build, config, tmp_path / "cut", progress=False, stop_after=7)  # last checkpoint: step 5
    resumed = train_labeller(build, config, tmp_path / "cut", progress=False)
    assert resumed["resumed_from"] == 5 and resumed["steps"] == full["steps"] == 12
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert "refine_head.weight" in a  # the saved weights are the average's, of the refine kind
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    model, _, loaded = load_labeller(tmp_path / "full")
    assert loaded.model.kind == "refine" and loaded.train.ema_decay == 0.9


def test_ema_weights_are_what_is_saved(build, tmp_path):
    config = small_config(max_steps=5, eval_every=5, patience=100, ema_decay=0.5)  # one validation, at the last checkpoint
    train_labeller(build, config, tmp_path / "m", progress=False)
    last = torch.load(tmp_path / "m" / "checkpoints" / "last.pt", weights_only=True)
    saved = load_file(tmp_path / "m" / "model.safetensors")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    raw = last["model"]
    assert all(torch.equal(saved[k], ema[k]) for k in saved)  # the validated weights are the average
    assert not all(torch.equal(saved[k], raw[k]) for k in saved)


def test_max_minutes_ends_training_early_and_keeps_a_model(build, tmp_path, monkeypatch):
    import couplet.modelling.loop as loop_module

    clock = iter(range(0, 10**6, 30))  # every perf_counter call: 30 s later
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: float(next(clock)))
    summary = train_labeller(build, small_config(epochs=50, max_minutes=1.0), tmp_path / "m", progress=False)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["out_of_time"] and summary["steps"] < 50 * metrics["steps_per_epoch"]
    assert (tmp_path / "m" / "model.safetensors").is_file() and metrics["best_valid_loss"] is not None


# --------------------------------------------------------------------------- swapped pairs (train.swapped_pairs)


def test_swapped_batches_double_the_rows_with_their_direction(build):
    from couplet.data.batches import DOWN, UP, count_rows, with_swaps

    train = load_split(build, "train")
    swapped = with_swaps(train)
    assert count_rows(swapped) == 2 * count_rows(train) and sorted(swapped) == sorted(train)
    for length, (up, down) in train.items():
        inp, out, direction = swapped[length]
        n = len(up)
        assert (direction[:n] == DOWN).all() and (direction[n:] == UP).all() and direction.dtype == np.int64
        assert np.array_equal(inp[:n], up) and np.array_equal(out[:n], down)  # the pairs as they are
        assert np.array_equal(inp[n:], down) and np.array_equal(out[n:], up)  # then the lower line in, the upper out
    plain, both = LengthBucketBatches(train, 2, seed=3), LengthBucketBatches(swapped, 2, seed=3)
    assert len(both) == sum(-(-2 * len(u) // 2) for u, _ in train.values()) >= 2 * len(plain) - len(train)
    pairs = {tuple(map(tuple, (u, d))) for u, d in ((u, d) for up, down in train.values() for u, d in zip(up.tolist(), down.tolist()))}
    directions = set()
    for up, down, direction in both:
        assert direction.shape == (2,) and up.shape == down.shape
        for u, d, k in zip(up.tolist(), down.tolist(), direction.tolist()):
            assert ((tuple(u), tuple(d)) if k == DOWN else (tuple(d), tuple(u))) in pairs
            directions.add(k)
    assert directions == {DOWN, UP} and both.epoch == 1


def test_swapped_pairs_train_one_model_for_both_directions(build, tmp_path):
    from couplet.predictor import Predictor

    plain = train_labeller(build, small_config(max_steps=2, swapped_pairs=False), tmp_path / "plain", progress=False)
    out = tmp_path / "both"
    summary = train_labeller(build, small_config(epochs=15, patience=100), out, progress=False)
    metrics, plain_metrics = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "plain"))
    # 7 train pairs, lengths 4 4 5 5 5 6 7, batches of 4 per length: 1+1+1+1 without swaps, 1+2+1+1 with them
    assert (plain_metrics["steps_per_epoch"], metrics["steps_per_epoch"]) == (4, 5)
    assert metrics["train_rows"] == plain_metrics["train_rows"] == 7  # pairs (the swaps are made in training)
    assert metrics["valid_rows"] == plain_metrics["valid_rows"] and plain["steps"] == 2
    assert summary["best_valid_loss"] < 0.5  # validation: upper -> lower only, as without swaps
    model, vocab, config = load_labeller(out)
    assert config.model.directions == 2 and config.train.swapped_pairs and model.direction is not None
    predictor = Predictor.load(out)
    for up, down in PAIRS[:3]:
        answer = predictor.match(down, direction="up", constrained=False)
        assert len(answer.best) == len(down)
    ups = [predictor.match(d, direction="up", constrained=False).best for _, d in PAIRS]
    assert sum(u == up for u, (up, _) in zip(ups, PAIRS)) >= len(PAIRS) - 1  # it learnt the way back too
    batch = predictor.match_batch([d for _, d in PAIRS], direction="up", constrained=False)
    assert [r.best for r in batch] == ups


def test_swapped_pairs_need_two_directions(build, tmp_path):
    from couplet.core.config import ConfigError

    config = replace(small_config(max_steps=2), "model", directions=1)
    with pytest.raises(ConfigError, match=r"^train\.swapped_pairs=true needs model\.directions=2 .*train\.swapped_pairs=false$"):
        train_labeller(build, config, tmp_path / "m", progress=False)
    summary = train_labeller(build, replace(config, "train", swapped_pairs=False), tmp_path / "m", progress=False)
    assert summary["steps"] == 2 and "direction.weight" not in load_file(tmp_path / "m" / "model.safetensors")
