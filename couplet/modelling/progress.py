"""What a training run shows as it goes and leaves beside the weights: the progress bar, the probe lines
(catalog.PROBE_LINES, decoded the seed's way, on the console and in samples.md) and the loss curve (curve.png).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from couplet.core.atomic import atomic_path, atomic_write_text
from couplet.modelling.model import CoupletLabeller
from couplet.data.vocab import PAD, UNK, Vocab
from couplet.data.wordtags import tag_matrix


@torch.no_grad()
def argmax_lines(model: CoupletLabeller, vocab: Vocab, lines: list[str], device) -> list[str]:
    """The seed's decoder: per-position argmax, never PAD, UNK, or the upper line's character at that position."""
    out = []
    for line in lines:
        ids = torch.tensor([vocab.encode(line)], device=device)  # (1, L)
        tags = torch.from_numpy(tag_matrix([line])).to(device) if getattr(model, "word_tags", None) is not None else None
        logp = model.log_probs(ids, tags=tags)[0]  # (L, V)
        logp[:, [PAD, UNK]] = -math.inf
        logp[torch.arange(len(line), device=device), ids[0]] = -math.inf  # no same-position copy
        out.append(vocab.decode(logp.argmax(-1).tolist()))
    return out


def append_samples(path: Path, title: str, lines: list[str], outputs: list[str], progress: bool) -> None:
    block = [f"## {title}", "", "| 上联 | 下联 |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in zip(lines, outputs)], ""]
    old = path.read_text(encoding="utf-8") if path.exists() else "# Probe lines (argmax decoding)\n\n"
    atomic_write_text(path, old + "\n".join(block) + "\n")
    say = _tqdm_write if progress else print
    say(f"[{title}] " + "  ".join(f"{a}→{b}" for a, b in zip(lines, outputs)))


def _tqdm_write(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text)


def write_curve(path: Path, history: list[list]) -> None:
    """train / valid loss vs step as a PNG (Agg canvas: no global backend switch), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [(s, t) for s, t, _ in history if t is not None]
    valid = [(s, v) for s, _, v in history if v is not None]
    if train:
        ax.plot(*zip(*train), label="train")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per character")
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:  # the temporary name ends in .png: savefig picks the format from it
        fig.savefig(tmp)


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
