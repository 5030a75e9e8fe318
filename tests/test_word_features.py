"""jieba word tags as labeller features (issue 20, item 5c): the tags of a line, the build's tag columns, the batches
that carry them, a model that trains and answers with them, and models without them unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datagen import layout_files, make_pairs, write_tarball
from modelkit import TINY, save_tiny_model, tiny_vocab
from shardkit import make_build_dir

from couplet.core.catalog import MODEL_FILES
from couplet.core.config import Config, ConfigError, DataConfig, replace
from couplet.data.batches import DOWN, UP, LengthBucketBatches, load_split, one_way, with_swaps
from couplet.data.build import run_build
from couplet.data.ingest import run_ingest
from couplet.data.validate import run_validate
from couplet.data.wordtags import N_TAGS, PAD_TAG, PUNCT_TAG, line_tags, pos_class, pos_words, tag_matrix, word_tag
from couplet.modelling.model import build_labeller, load_labeller
from couplet.modelling.train import train_labeller

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tags_of_a_known_line():
    # jieba.posseg (no HMM): 白日/t 依/d 山/n 尽/v, then the comma (x), then 黄河/ns 入海流/ns
    assert pos_words("白日依山尽") == ((0, 2, "t"), (2, 3, "d"), (3, 4, "n"), (4, 5, "v"))
    expected = [word_tag("B", "noun"), word_tag("E", "noun"), word_tag("S", "adv"), word_tag("S", "noun"),
                word_tag("S", "verb"), PUNCT_TAG, word_tag("B", "noun"), word_tag("E", "noun"), word_tag("B", "noun"),
                word_tag("M", "noun"), word_tag("E", "noun")]
    assert line_tags("白日依山尽，黄河入海流") == expected
    assert len(set(expected)) == 7 and PAD_TAG not in expected and max(expected) < N_TAGS
    # a word of three or more characters: B, M .., E; an idiom (i) is "other"
    assert line_tags("春风得意马蹄疾")[:4] == [word_tag(b, pos_class("i")) for b in "BMME"]
    matrix = tag_matrix(["白日依山尽", "春风得意"], 5)  # a shorter line is padded
    assert matrix.dtype == np.int8 and matrix.tolist() == [line_tags("白日依山尽"), line_tags("春风得意") + [PAD_TAG]]
    assert tag_matrix(["白日依山尽"], cached=True).tolist() == [line_tags("白日依山尽")]


def test_evaluation_reads_the_same_rules():
    from couplet.evaluation import metrics
    from couplet.data import wordtags

    assert metrics.pos_class is wordtags.pos_class and metrics.pos_words is wordtags.pos_words


def _build(tmp_path: Path, home: Path, word_tags: bool) -> dict:
    source = write_tarball(tmp_path / "data.tar.gz", layout_files(make_pairs(200, seed=1), make_pairs(20, seed=2)))
    config = DataConfig(source=str(source), word_tags=word_tags)
    return run_build(run_validate(run_ingest(config, home), config, home), config, home)


@pytest.fixture(scope="module")
def tagged_build(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("tagged")
    (tmp / "home").mkdir()
    return _build(tmp, tmp / "home", word_tags=True)


def test_build_stores_both_lines_tags_and_keys_them(tagged_build, tmp_path):
    build_dir = Path(tagged_build["build_dir"])
    assert tagged_build["params"]["word_tags"] is True
    for shard in tagged_build["shards"]:
        table = pq.read_table(build_dir / shard["path"])
        for line, tags in (("up", "up_tags"), ("down", "down_tags")):
            assert table.schema.field(tags).type.value_type == "int8"
            assert table[tags].to_pylist() == tag_matrix(table[line].to_pylist(), shard["length"]).tolist()
    (tmp_path / "home").mkdir()
    plain = _build(tmp_path, tmp_path / "home", word_tags=False)
    assert plain["key"] != tagged_build["key"] and "word_tags" not in plain["params"]
    assert "up_tags" not in pq.read_schema(Path(plain["build_dir"]) / plain["shards"][0]["path"]).names


def test_batches_carry_the_input_lines_tags(tagged_build):
    build_dir = tagged_build["build_dir"]
    plain, tagged = load_split(build_dir, "train"), load_split(build_dir, "train", tags=True)
    assert sorted(plain) == sorted(tagged)
    for length, (up, down, up_tags, down_tags) in tagged.items():
        assert np.array_equal(up, plain[length][0]) and np.array_equal(down, plain[length][1])
        assert up_tags.shape == up.shape and up_tags.dtype == np.int64 and (up_tags > 0).all()
        n = len(up)
        inp, out, direction, tags = with_swaps(tagged)[length]
        assert np.array_equal(tags[:n], up_tags) and np.array_equal(tags[n:], down_tags)  # the swaps: the lower line's
        assert (direction[:n] == DOWN).all() and (direction[n:] == UP).all() and np.array_equal(inp[n:], down)
        assert np.array_equal(one_way(tagged)[length][3], up_tags) and (one_way(tagged)[length][2] == DOWN).all()
    for up, down, direction, tags in LengthBucketBatches(with_swaps(tagged), 8, seed=0):
        assert tags.shape == up.shape and direction.shape == (8,)
        break


def test_shards_without_tag_columns_are_tagged_on_load(tmp_path):
    pairs = [("白日依山尽", "黄河入海流"), ("春风得意", "秋月扬辉")]
    build = make_build_dir(tmp_path, pairs)
    tagged = load_split(build, "train", tags=True)
    assert tagged[5][2].tolist() == [line_tags("白日依山尽")] and tagged[5][3].tolist() == [line_tags("黄河入海流")]


def _small(**model) -> Config:
    config = replace(Config(), "data", word_tags=True)
    config = replace(config, "model", embed_dim=32, n_blocks=2, **model)
    return replace(config, "train", batch_size=8, lr=2e-2, num_threads=1, checkpoint_every=50, max_steps=6)


def test_a_model_with_word_features_trains_and_answers(tagged_build, tmp_path):
    from couplet.predictor import Predictor

    out = tmp_path / "model"
    summary = train_labeller(tagged_build["build_dir"], _small(word_features=True), out, progress=False)
    assert summary["steps"] == 6 and summary["best_valid_loss"] is not None
    model, _, config = load_labeller(out)
    assert config.model.word_features and model.word_tags is not None
    assert float(model.word_tags.weight[1:].detach().abs().sum()) > 0 and float(model.word_tags.weight[0].detach().abs().sum()) == 0  # learnt; PAD stays 0
    predictor = Predictor.load(out)
    up, down = make_pairs(3, seed=7)[0]
    answer = predictor.match(up, constrained=False)
    assert len(answer.best) == len(up)
    assert len(predictor.match(down, direction="up", constrained=False).best) == len(down)
    assert [r.best for r in predictor.match_batch([up], constrained=False)] == [answer.best]
    # the tags are what the model reads: the same ids with other tags answer otherwise
    ids = torch.tensor([[predictor.vocab.stoi.get(ch, 1) for ch in up]])
    real = model.log_probs(ids, tags=torch.from_numpy(tag_matrix([up])))
    assert not torch.allclose(real, model.log_probs(ids, tags=torch.full_like(ids, PUNCT_TAG)))
    assert np.allclose(predictor.log_probs([up])[0], real[0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="word tag"):
        model.log_probs(ids)


def test_word_features_need_a_tagged_build(tmp_path):
    build = make_build_dir(tmp_path, [("白日依山尽", "黄河入海流"), ("春风得意", "秋月扬辉")], word_tags=False)
    with pytest.raises(ConfigError, match=r"model\.word_features=true .* set data\.word_tags=true too$"):
        train_labeller(build, _small(word_features=True), tmp_path / "m", progress=False)


def test_a_model_without_the_feature_is_unchanged(tmp_path):
    vocab = tiny_vocab()
    torch.manual_seed(0)
    without = build_labeller(len(vocab), TINY.model_copy(update={"word_features": False}))
    torch.manual_seed(0)
    with_tags = build_labeller(len(vocab), TINY.model_copy(update={"word_features": True}))
    assert without.word_tags is None and not any(k.startswith("word_tags") for k in without.state_dict())
    extra = set(with_tags.state_dict()) - set(without.state_dict())
    assert extra == {"word_tags.weight"}  # the only new parameter, zero at first: every other weight starts the same
    assert all(torch.equal(v, with_tags.state_dict()[k]) for k, v in without.state_dict().items())
    ids = torch.tensor([vocab.encode("春风得意马蹄疾")])
    tags = torch.from_numpy(tag_matrix(["春风得意马蹄疾"]))
    assert torch.equal(without.log_probs(ids), without.log_probs(ids, tags=tags))  # tags mean nothing to it
    assert torch.allclose(without.log_probs(ids), with_tags.log_probs(ids, tags=tags))  # zero tag rows: the same answer
    # a folder written before the field: no word_features in config.json, loads as off and answers as before
    folder = save_tiny_model(tmp_path / "old")
    raw = json.loads((folder / MODEL_FILES.config).read_text())
    del raw["model"]["word_features"], raw["data"]["word_tags"]
    (folder / MODEL_FILES.config).write_text(json.dumps(raw))
    model, _, config = load_labeller(folder)
    assert config.model.word_features is False and model.word_tags is None
    from couplet.predictor import Predictor

    assert Predictor.load(folder).match("春风得意马蹄疾", constrained=False).best
