"""`save_tiny_model`: a model folder with random weights, as the train stage leaves one, for tests that need
a model to load and answer, not a trained one (the `tiny_model_dir` fixture of conftest.py is one, shared)."""

from __future__ import annotations

from pathlib import Path

import torch

from couplet.core.config import Config, ModelConfig
from couplet.data.vocab import Vocab
from couplet.modelling.model import build_labeller, save_labeller

CHARS = "春风得意马蹄疾秋月扬明辉海阔凭鱼跃天高任鸟飞山水花草云雨红绿日夜，。"
UPPER = "春风得意马蹄疾"  # every character in CHARS
TINY = ModelConfig(kind="gated_cnn", embed_dim=16, n_blocks=2, kernel_size=3, dropout=0.0, word_features=False)


def tiny_vocab(chars: str = CHARS) -> Vocab:
    return Vocab.from_counts({ch: 3 for ch in chars}, min_count=1)


def save_tiny_model(folder: Path, config: Config | None = None, vocab: Vocab | None = None, seed: int = 0) -> Path:
    """A labeller of `config.model`'s kind (default: TINY) over `vocab` (default: CHARS), its weights drawn
    with torch seed `seed`, saved to `folder`. Returns `folder`."""
    vocab = vocab or tiny_vocab()
    config = config or Config(model=TINY)
    torch.manual_seed(seed)
    save_labeller(build_labeller(len(vocab), config.model).eval(), vocab, config, folder)
    return folder
