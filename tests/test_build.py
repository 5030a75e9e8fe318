import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import snapshot
from datagen import layout_files, make_pairs, write_tarball

from couplet.core.catalog import BUILD_FILES, STAGE_MANIFEST
from couplet.data import build as build_mod
from couplet.data.batches import load_split
from couplet.data.build import pair_hash, read_build_manifest, read_build_vocab, run_build
from couplet.core.config import DataConfig
from couplet.data.ingest import run_ingest
from couplet.data.validate import run_validate


def _prepare(tmp_path, home, train, test, name="data.tar.gz", **cfg):
    source = write_tarball(tmp_path / name, layout_files(train, test))
    config = DataConfig(source=str(source), **cfg)
    validated = run_validate(run_ingest(config, home), config, home)
    return validated, config


def _read_split(build, split):
    rows = []
    for shard in build["shards"]:
        if shard["split"] == split:
            rows += pq.read_table(Path(build["build_dir"]) / shard["path"]).to_pylist()
    return rows


def _reference_hash(up: str, down: str) -> int:
    """FNV-1a over codepoints + splitmix64 finaliser, in plain Python integers."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for ch in up + down:
        h = ((h ^ ord(ch)) * 0x100000001B3) & mask
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & mask
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & mask
    return h ^ (h >> 31)


def test_pair_hash_is_pinned():
    pairs = [("春风", "秋雨"), ("晚风摇树树还挺", "晨露润花花更红")]
    for u, d in pairs:
        up = np.array([[ord(c) for c in u]], dtype=np.uint32)
        down = np.array([[ord(c) for c in d]], dtype=np.uint32)
        assert int(pair_hash(up, down)[0]) == _reference_hash(u, d)
    # A change here reshuffles train/valid for every user: bump build.CODE_VERSION if it is intended.
    assert _reference_hash("春风", "秋雨") == 2425026050074996685


def test_splits_dedupe_vocab_and_shards(tmp_path, home):
    train = make_pairs(400, seed=1)
    test = make_pairs(40, seed=2)
    leaked = test[:3]
    validated, cfg = _prepare(tmp_path, home, train + train[:10] + leaked, test, valid_fraction=0.2)
    result = run_build(validated, cfg, home)
    splits = {s: _read_split(result, s) for s in ("train", "valid", "test")}
    pairs = {s: [(r["up"], r["down"]) for r in rows] for s, rows in splits.items()}
    for s in pairs:
        assert len(pairs[s]) == len(set(pairs[s])), f"duplicates in {s}"
    assert not set(pairs["test"]) & (set(pairs["train"]) | set(pairs["valid"]))
    assert not set(pairs["train"]) & set(pairs["valid"])
    assert len(pairs["test"]) == len(set(test))
    assert 0 < len(pairs["valid"]) < len(pairs["train"])
    assert result["counts"] == {s: len(p) for s, p in pairs.items()}

    build_dir = Path(result["build_dir"])
    assert sorted(p.relative_to(build_dir).as_posix() for p in build_dir.rglob("*") if p.is_file()) == sorted(
        [BUILD_FILES.vocab, STAGE_MANIFEST, *(BUILD_FILES.shard(s["split"], s["length"]) for s in result["shards"])])
    assert BUILD_FILES.shard("train", 7) == "train/len-07.parquet"
    vocab = read_build_vocab(build_dir)
    assert vocab.itos[:2] == ["<pad>", "<unk>"]
    train_chars = {c for u, d in pairs["train"] for c in u + d}
    assert set(vocab.itos[2:]) <= train_chars
    for shard in result["shards"]:
        table = pq.read_table(Path(result["build_dir"]) / shard["path"])
        assert table.schema.names == ["up", "down", "length", "up_ids", "down_ids", "up_tags", "down_tags"]  # data.word_tags
        assert set(table["length"].to_pylist()) == {shard["length"]}
        for row in table.to_pylist()[:20]:
            assert len(row["up_ids"]) == shard["length"] == len(row["up"])
            assert row["up_ids"] == vocab.encode(row["up"]) and row["down_ids"] == vocab.encode(row["down"])
    meta = pq.ParquetFile(Path(result["build_dir"]) / result["shards"][0]["path"]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_unordered_is_the_same_for_a_pair_and_its_swap():
    rng = np.random.default_rng(0)
    up = rng.integers(0x4E00, 0x4E10, size=(200, 5)).astype(np.uint32)  # few characters: many shared prefixes
    down = rng.integers(0x4E00, 0x4E10, size=(200, 5)).astype(np.uint32)
    down[:10] = up[:10]  # equal lines too
    a, b = build_mod.unordered(up, down), build_mod.unordered(down, up)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(build_mod.pair_hash(*a), build_mod.pair_hash(*b))
    assert all(tuple(f) <= tuple(s) for f, s in zip(a[0].tolist(), a[1].tolist()))


def test_a_pair_and_its_swap_share_a_split_and_a_swap_of_test_leaves_train(tmp_path, home):
    train = make_pairs(300, seed=21)
    test = make_pairs(20, seed=22)
    swaps = [(d, u) for u, d in train[:150]]
    swapped_test = [(d, u) for u, d in test[:4]]
    validated, cfg = _prepare(tmp_path, home, train + swaps + swapped_test, test, valid_fraction=0.3)
    result = run_build(validated, cfg, home)
    pairs = {s: {(r["up"], r["down"]) for r in _read_split(result, s)} for s in ("train", "valid", "test")}
    for u, d in train[:150]:
        if (u, d) in pairs["train"] | pairs["valid"]:
            side = "train" if (u, d) in pairs["train"] else "valid"
            assert (d, u) in pairs[side], (u, d)  # the swap landed beside it
    assert pairs["valid"] and any((d, u) in pairs["valid"] for u, d in pairs["valid"] if u != d)
    assert not {(d, u) for u, d in pairs["test"]} & (pairs["train"] | pairs["valid"])  # no swap of a test pair
    assert len(pairs["test"]) == len(set(test))


def test_min_count_and_unk(tmp_path, home):
    train = make_pairs(100) + [("奇字春风", "怪词秋雪")]
    validated, cfg = _prepare(tmp_path, home, train, make_pairs(5, seed=5), valid_fraction=0.0, min_count=2)
    result = run_build(validated, cfg, home)
    vocab = read_build_vocab(result["build_dir"])
    assert "奇" not in vocab.stoi and vocab.encode("奇")[0] == 1
    assert all(vocab.counts[c] >= 2 for c in vocab.itos[2:])


def test_split_is_stable_when_data_is_appended(tmp_path, home):
    base = make_pairs(300, seed=11)
    v1, cfg = _prepare(tmp_path, home, base, make_pairs(10, seed=12), name="v1.tar.gz", valid_fraction=0.2)
    first = run_build(v1, cfg, home)
    v2, cfg2 = _prepare(tmp_path, home, base + make_pairs(100, seed=13), make_pairs(10, seed=12), name="v2.tar.gz", valid_fraction=0.2)
    second = run_build(v2, cfg2, home)
    valid1 = {(r["up"], r["down"]) for r in _read_split(first, "valid")}
    valid2 = {(r["up"], r["down"]) for r in _read_split(second, "valid")}
    train1 = {(r["up"], r["down"]) for r in _read_split(first, "train")}
    assert valid1 <= valid2 and not (train1 & valid2)


def test_cached_and_missing_files_are_a_miss(tmp_path, home):
    validated, cfg = _prepare(tmp_path, home, make_pairs(50), make_pairs(5, seed=3))
    first = run_build(validated, cfg, home)
    assert run_build(validated, cfg, home)["status"] == "cached"
    (Path(first["build_dir"]) / first["shards"][0]["path"]).unlink()
    again = run_build(validated, cfg, home)
    assert again["status"] == "completed"
    assert (Path(first["build_dir"]) / first["shards"][0]["path"]).is_file()


def test_crash_leaves_previous_version_intact(tmp_path, home, monkeypatch):
    validated, cfg = _prepare(tmp_path, home, make_pairs(80), make_pairs(5, seed=3))
    first = run_build(validated, cfg, home)
    before = snapshot(home / "data" / "processed")
    calls = {"n": 0}
    real_write = build_mod.RowGroupWriter.write

    def flaky_write(self, *args, **kwargs):  # the second piece of a shard written: the first shard is on disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(build_mod.RowGroupWriter, "write", flaky_write)
    with pytest.raises(OSError, match="simulated"):
        run_build(validated, cfg, home, force=True)
    assert snapshot(home / "data" / "processed") == before
    assert not [p for p in (home / "data" / "processed" / "build").iterdir() if p.name.startswith(".")]
    assert read_build_manifest(first["build_dir"])["key"] == first["key"]


def test_an_unfinished_build_folder_is_one_line_naming_it(tmp_path):
    folder = tmp_path / "build" / "half"
    folder.mkdir(parents=True)
    (folder / BUILD_FILES.vocab).write_text("{}", encoding="utf-8")  # no manifest: the stage did not finish
    for read in (read_build_manifest, lambda d: load_split(d, "train")):
        with pytest.raises(FileNotFoundError, match=rf"^{re.escape(f'{folder}: no {STAGE_MANIFEST}')} \(not a finished stage folder\)$"):
            read(folder)
