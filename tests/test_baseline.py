"""The per-character dictionary baseline (couplet.evaluation.baseline) and its place in the evaluate stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from modelkit import save_tiny_model
from shardkit import make_build_dir

from couplet.evaluation.baseline import BASELINE_ID, FLOOR, PHRASE_BASELINE_ID, DictionaryBaseline
from couplet.core.config import Config, DataConfig, EvaluateConfig, ModelConfig
from couplet.decoding.decode import ARGMAX
from couplet.evaluation.evaluate import evaluate_pairs, run_evaluate
from couplet.data.vocab import PAD, UNK

# 天 is aligned with 天 five times (never the answer), with 山 three times and with 地 once;
# 海 only ever appears in lower lines; 水 is the most frequent lower character.
TRAIN = [("天风", "天水")] * 5 + [("天云", "山水")] * 3 + [("天花", "地水")] + [("风云", "海水"), ("云，花", "水，草")]
TEST = [("天风", "山雨"), ("海天", "水山"), ("龘天", "水山")]


@pytest.fixture
def build(tmp_path):
    return make_build_dir(tmp_path, TRAIN, test_pairs=TEST)


@pytest.fixture
def baseline(build):
    return DictionaryBaseline.from_build(build)


def test_most_frequent_aligned_character_never_the_same(baseline):
    assert baseline.lookup("天") == "山"  # 天 x5 is left out, 山 x3 beats 地 x1
    assert baseline.lookup("，") == "，"  # a mark is aligned with a mark
    lp = baseline.log_probs(["天天"])
    assert lp.shape == (1, 2, len(baseline.vocab)) and lp.dtype == np.float32
    row = lp[0, 0]
    stoi = baseline.vocab.stoi
    assert row[stoi["天"]] == row[PAD] == row[UNK] == FLOOR and np.isfinite(lp).all()
    assert np.exp(row).sum() == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(row[stoi["海"]])  # smoothed: every other character stays possible
    assert baseline.match("天风", options=ARGMAX).best[0] == "山"  # the arg-max is the dictionary's entry


def test_unseen_characters_fall_back_to_lower_frequency(baseline):
    assert baseline.lookup("海") is None and baseline.lookup("龘") is None
    # 海 never was an upper character, 龘 is outside the vocabulary (UNK): both answer the most
    # frequent lower character, 水
    assert baseline.match("海", options=ARGMAX, allow_unknown=True).best == "水"
    assert baseline.match("龘", options=ARGMAX, allow_unknown=True).best == "水"


def test_the_decoders_constraints_apply(baseline):
    # 云 (x5) and 花 (x1, tied with 草) both map to 水; distinct upper characters need distinct lower
    # ones, so 花 takes its next best, 草; the mark is copied in place
    assert baseline.match("云花", options=ARGMAX).best == "水水"
    result = baseline.match("云花云，花")
    assert result.best == "水草水，草" and not result.relaxed


def test_evaluate_pairs_scores_the_baseline(baseline):
    uppers, refs = [u for u, _ in TEST], [d for _, d in TEST]
    metrics, predictions = evaluate_pairs(baseline, uppers, refs)
    assert metrics["model"] == BASELINE_ID and metrics["n_unanswerable"] == 0
    assert predictions[0] == "山水" and metrics["ideograph_positions"] == 6
    assert 0 < metrics["ideograph_accuracy"] <= 1 and metrics["copy_rate"] == 0.0


def test_counting_works_at_the_corpus_scale(tmp_path):
    """The corpus's scale (242k couplets of 7 characters, a vocabulary of 8k); its speed is bench_baseline.py's to
    measure (a timed test fails on a busy machine)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from couplet.data.vocab import PAD_TOKEN, UNK_TOKEN, Vocab

    rows, length, size = 240_000, 7, 8000
    Vocab(itos=[PAD_TOKEN, UNK_TOKEN, *(chr(0x4E00 + i) for i in range(size - 2))]).save(tmp_path / "vocab.json")
    rng = np.random.default_rng(0)
    offsets = pa.array(np.arange(0, rows * length + 1, length, dtype=np.int32))
    ids = {name: pa.ListArray.from_arrays(offsets, pa.array(rng.integers(1, size, rows * length, dtype=np.int32)))
           for name in ("up_ids", "down_ids")}
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table(ids), tmp_path / "train" / "len-07.parquet")
    shard = {"split": "train", "length": length, "rows": rows, "path": "train/len-07.parquet"}
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [shard]}))
    baseline = DictionaryBaseline.from_build(tmp_path)
    assert baseline.lookup(chr(0x4E00)) is not None


# --------------------------------------------------------------------------- the evaluate stage


def test_run_evaluate_writes_the_baseline(tmp_path, build):
    from couplet.data.vocab import Vocab

    vocab = Vocab.load(build / "vocab.json")
    model = ModelConfig(kind="gated_cnn", embed_dim=16, n_blocks=1, word_features=False)
    config = Config(data=DataConfig(max_len=8), model=model, evaluate=EvaluateConfig(n_samples=2))
    model_dir = save_tiny_model(tmp_path / "home" / "models" / "run-1", config, vocab)
    trained = {"key": "train-key", "model": str(model_dir), "run_id": "run-1"}
    result = run_evaluate(trained, {"build_dir": str(build)}, config, tmp_path / "home")

    saved = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    test, base, dictionary = saved["test"], saved["test_baseline"], saved["test_dictionary"]
    assert base["model"] == PHRASE_BASELINE_ID and base["n_test"] == test["n_test"] == len(TEST)  # the floor
    assert dictionary["model"] == BASELINE_ID and dictionary["n_test"] == len(TEST)  # kept for reference
    assert test["dictionary_ideograph_accuracy"] == dictionary["ideograph_accuracy"]
    assert base["test_fingerprint"] == test["test_fingerprint"]
    assert test["baseline_ideograph_accuracy"] == base["ideograph_accuracy"]
    assert test["beats_baseline"] == (test["ideograph_accuracy"] > base["ideograph_accuracy"])
    assert result["baseline_metrics"] == base and result["beats_baseline"] == test["beats_baseline"]
    assert all("baseline" in row for row in result["samples"])

    samples = (model_dir / "samples.md").read_text(encoding="utf-8")
    assert "|  | upper (上联) | reference (下联) | model | phrase-table baseline |" in samples
    assert "| phrase-table baseline | " in samples and "| dictionary (reference) | " in samples and "ideograph acc" in samples
    assert ("does **not** beat the phrase-table baseline" in samples) == (not test["beats_baseline"])
    manifest = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))
    assert manifest["baseline_metrics"]["ideograph_accuracy"] == base["ideograph_accuracy"]
