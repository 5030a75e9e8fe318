"""Test helper: a tiny build directory in the layout of docs/design.md ("Build output")."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from couplet.core.catalog import BUILD_FILES, STAGE_MANIFEST
from couplet.data.build import with_word_tags
from couplet.data.vocab import Vocab


def make_build_dir(
    tmp_path: Path,
    pairs: list[tuple[str, str]],
    valid_pairs: list[tuple[str, str]] = (),
    test_pairs: list[tuple[str, str]] = (),
    name: str = "build",
    word_tags: bool = True,
) -> Path:
    """Write vocab.json (from the train pairs, min_count=1), <split>/len-LL.parquet shards and manifest.json; with
    `word_tags` (data.word_tags, the default) the shards hold both lines' jieba word tags, as the build writes them."""
    build = Path(tmp_path) / name
    build.mkdir(parents=True)
    vocab = Vocab.from_counts(Counter("".join(up + down for up, down in pairs)), min_count=1)
    vocab.save(build / BUILD_FILES.vocab)
    shards, counts = [], {}
    for split, rows in (("train", pairs), ("valid", valid_pairs), ("test", test_pairs)):
        counts[split] = len(rows)
        for length in sorted({len(up) for up, _ in rows}):
            group = [(up, down) for up, down in rows if len(up) == length]
            assert all(len(down) == length for _, down in group), "test pairs must be aligned"
            table = pa.table({
                "up": [up for up, _ in group],
                "down": [down for _, down in group],
                "length": pa.array([length] * len(group), pa.int16()),
                "up_ids": pa.array([vocab.encode(up) for up, _ in group], pa.list_(pa.int32())),
                "down_ids": pa.array([vocab.encode(down) for _, down in group], pa.list_(pa.int32())),
            })
            if word_tags:
                table = with_word_tags(table, length)
            rel = BUILD_FILES.shard(split, length)
            (build / split).mkdir(exist_ok=True)
            pq.write_table(table, build / rel)
            sha = hashlib.sha256((build / rel).read_bytes()).hexdigest()
            shards.append({"split": split, "length": length, "rows": len(group), "path": rel, "sha256": sha})
    key = hashlib.sha256(json.dumps([pairs, list(valid_pairs), list(test_pairs)], ensure_ascii=False).encode()).hexdigest()[:16]
    manifest = {"key": key, "dataset_version": "test", "vocab_size": len(vocab), "counts": counts, "shards": shards,
                "params": {"word_tags": True} if word_tags else {}}
    (build / STAGE_MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    return build
