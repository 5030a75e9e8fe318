"""A second, down-weighted training source (data.extra_source, train.extra_share; couplet/data/extra.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datagen import layout_files, make_pairs, write_tarball

from couplet.cached_run import _source_sha256
from couplet.core.config import Config, DataConfig, replace
from couplet.data.batches import LengthBucketBatches, load_split, with_swaps
from couplet.data.build import build_key, read_build_vocab, run_build
from couplet.data.extra import extra_data_config
from couplet.data.ingest import run_ingest
from couplet.data.raw import IngestError
from couplet.data.validate import run_validate
from couplet.modelling.train import train_labeller

PRIMARY_TRAIN, PRIMARY_TEST = make_pairs(300, seed=0), make_pairs(40, seed=1)
NEW = make_pairs(120, seed=2)  # extra pairs the primary source does not have


def _rows(build: dict, split: str) -> list[tuple[str, str]]:
    rows = []
    for shard in sorted((s for s in build["shards"] if s["split"] == split), key=lambda s: s["length"]):
        table = pq.read_table(Path(build["build_dir"]) / shard["path"], columns=["up", "down"])
        rows += zip(table["up"].to_pylist(), table["down"].to_pylist())
    return rows


@pytest.fixture
def primary(tmp_path, home):
    """(validated, config, build without an extra source) of a small primary dataset."""
    source = write_tarball(tmp_path / "primary.tar.gz", layout_files(PRIMARY_TRAIN, PRIMARY_TEST))
    config = DataConfig(source=str(source), valid_fraction=0.1)
    validated = run_validate(run_ingest(config, home), config, home)
    return validated, config, run_build(validated, config, home)


def _extra_tarball(path: Path, train: list[tuple[str, str]]) -> Path:
    return write_tarball(path, layout_files(train, make_pairs(5, seed=3)))


def test_extra_pairs_join_training_and_valid_test_vocab_stay_the_primarys(primary, tmp_path, home):
    validated, config, plain = primary
    valid, test, train = _rows(plain, "valid"), _rows(plain, "test"), _rows(plain, "train")
    held_out = valid[:3] + [(d, u) for u, d in test[:3]]  # valid pairs, and swaps of test pairs
    unknown = ("龘" + NEW[0][0][1:], NEW[0][1])  # a character outside the primary vocabulary (upper line)
    unknown_down = (NEW[1][0], NEW[1][1][:-1] + "龘")  # and in the lower line
    broken = ("春风花月山", "秋雪草星")  # unequal lengths: breaks a validation rule
    extra_train = NEW[2:] + held_out + train[:4] + [NEW[2], (NEW[3][1], NEW[3][0]), unknown, unknown_down, broken]
    extra_source = _extra_tarball(tmp_path / "lines.tar.gz", extra_train)
    cfg = replace(Config(data=config), "data", extra_source=str(extra_source)).data
    built = run_build(validated, cfg, home)

    assert built["key"] != plain["key"] and built["status"] == "completed"
    for split in ("train", "valid", "test"):  # the primary splits are exactly those of the primary-only build
        assert _rows(built, split) == _rows(plain, split)
    assert read_build_vocab(built["build_dir"]).itos == read_build_vocab(plain["build_dir"]).itos
    assert built["vocab_size"] == plain["vocab_size"]

    extra = _rows(built, "extra")
    assert sorted(extra) == sorted(NEW[2:])  # the new pairs, once each; no held-out, primary, unknown or broken pair
    assert built["counts"]["extra"] == len(extra) and built["counts"]["valid"] == plain["counts"]["valid"]
    summary = built["extra"]
    assert summary["kept"] == len(NEW) - 2 and summary["rows_in"] == len(extra_train)
    assert summary["dropped"] == {"rules": 1, "in_primary_valid_test": len(held_out), "in_primary_train": 4,
                                  "duplicates": 2, "unknown_chars": 2}
    unordered_eval = {frozenset(p) for p in valid + test}
    assert not any(frozenset(p) in unordered_eval for p in extra)

    # the extra split loads like the others; a rebuild is cached; another extra source is another key
    assert sum(len(u) for u, _ in load_split(built["build_dir"], "extra").values()) == len(extra)
    assert run_build(validated, cfg, home)["status"] == "cached"
    assert build_key(validated["key"], cfg, _source_sha256(extra_data_config(cfg), home)) == built["key"]  # `couplet run`'s check
    other = _extra_tarball(tmp_path / "other.tar.gz", NEW[2:50])
    rebuilt = run_build(validated, cfg.model_copy(update={"extra_source": str(other)}), home)
    assert rebuilt["key"] not in (built["key"], plain["key"]) and rebuilt["counts"]["extra"] == 48


def test_a_missing_or_damaged_extra_source_is_one_line_naming_it(primary, tmp_path, home):
    validated, config, _ = primary
    missing = str(tmp_path / "nowhere.tar.gz")
    with pytest.raises(IngestError) as err:
        run_build(validated, config.model_copy(update={"extra_source": missing}), home)
    assert "data.extra_source" in str(err.value) and missing in str(err.value) and "\n" not in str(err.value)
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(_extra_tarball(tmp_path / "good.tar.gz", NEW).read_bytes()[:200])
    with pytest.raises(IngestError) as err:
        run_build(validated, config.model_copy(update={"extra_source": str(damaged)}), home)
    assert str(damaged) in str(err.value) and "corrupt" in str(err.value) and "\n" not in str(err.value)


def _buckets(n: int, length: int, start: int) -> dict:
    ids = np.arange(start, start + n * length, dtype=np.int64).reshape(n, length)
    return {length: (ids, ids + 1)}


def test_extra_share_of_each_epoch_with_swaps_and_a_fresh_sample():
    primary = _buckets(400, 5, 0)
    extra = {**_buckets(2000, 5, 10_000), **_buckets(1000, 7, 50_000)}
    plain = LengthBucketBatches(with_swaps(primary), 8, seed=3)
    ignored = LengthBucketBatches(with_swaps(primary), 8, seed=3, extra=with_swaps(extra), extra_share=0.0)
    assert [idx.tolist() for _, idx in plain.plan(0)] == [idx.tolist() for _, idx in ignored.plan(0)]

    mixed = LengthBucketBatches(with_swaps(primary), 8, seed=3, extra=with_swaps(extra), extra_share=0.25)
    seen = []
    for epoch in range(2):
        batches = list(mixed)
        assert len(batches) == len(mixed)
        ups = np.concatenate([b[0].reshape(-1) for b in batches])
        directions = np.concatenate([b[2] for b in batches])
        from_extra = np.concatenate([b[0][:, 0] >= 10_000 for b in batches])  # a swapped row's input is its lower line
        assert abs(from_extra.mean() - 0.25) < 0.02  # a quarter of the rows (up to topping up the last batches)
        assert set(directions[from_extra].tolist()) == {0, 1}  # extra rows come with their swaps too
        assert {int(b[0].shape[1]) for b in batches} == {5, 7}
        seen.append(set(ups[ups >= 10_000].tolist()))
    assert seen[0] != seen[1]  # a fresh sample of the extra rows every epoch


def test_training_draws_from_the_extra_split(primary, tmp_path, home):
    validated, config, _ = primary
    cfg = config.model_copy(update={"extra_source": str(_extra_tarball(tmp_path / "lines.tar.gz", NEW))})
    built = run_build(validated, cfg, home)
    train = replace(replace(Config(data=cfg), "model", embed_dim=16, n_blocks=1, attn_layers=1),
                    "train", batch_size=8, max_steps=2, num_threads=1, max_minutes=None, extra_share=0.5)
    summary = train_labeller(Path(built["build_dir"]), train, tmp_path / "m", progress=False)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert summary["steps"] == 2 and metrics["extra_rows"] == built["counts"]["extra"] > 0
    assert metrics["valid_rows"] == built["counts"]["valid"]
    # extra_share 0 ignores the extra split; with it an epoch is longer (here all 120 extra pairs: fewer than a half)
    train_labeller(Path(built["build_dir"]), replace(train, "train", extra_share=0.0), tmp_path / "off", progress=False)
    off = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert off["extra_rows"] == 0 and off["steps_per_epoch"] < metrics["steps_per_epoch"]
