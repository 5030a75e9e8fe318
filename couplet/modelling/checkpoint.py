"""The resumable state of a training run: `TrainState` and `models/<run-id>/checkpoints/last.pt`.

A checkpoint is a dict: fingerprint, config, model, optimizer, data (the batch position), best_weights,
rng, and progress (a `TrainState` as a dict). A run resumes it only when its fingerprint matches (model
config, the train fields that shape the trajectory, vocabulary size, build); one that was written for
another configuration, cannot be read, or does not load is ignored with a one-line notice (logger
"couplet.modelling.train") and training starts over.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from couplet.core.atomic import atomic_path
from couplet.core.config import Config, may_change_on_resume, with_former_defaults

log = logging.getLogger("couplet.modelling.train")


@dataclass
class TrainState:
    """A run's progress besides weights, optimiser, batch position and RNG: the checkpoint's `progress`."""

    step: int = 0
    best_valid_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # validations in a row without a new best
    stopped_early: bool = False
    history: list[list] = field(default_factory=list)  # [step, mean train loss since the last point, valid loss]
    run_loss: float = 0.0  # train loss summed over the steps since the last history point
    run_steps: int = 0
    seconds: float = 0.0  # wall time, tokens and time in train steps of the calls before this one (resumes)
    tokens: int = 0
    train_seconds: float = 0.0

    def flush(self, loss_sum: torch.Tensor) -> None:
        """Move the on-device running loss sum into run_loss (one device sync, only when logging)."""
        self.run_loss += float(loss_sum)
        loss_sum.zero_()

    def add_point(self, loss_sum: torch.Tensor, valid_loss: float | None = None) -> None:
        """Append (step, mean train loss since the last point, valid loss) to the history."""
        self.flush(loss_sum)
        train_loss = self.run_loss / self.run_steps if self.run_steps else None
        last = self.history[-1] if self.history else None
        if last is not None and last[0] == self.step:  # same step: fill in the valid loss
            last[2] = valid_loss if valid_loss is not None else last[2]
        elif train_loss is not None or valid_loss is not None:
            self.history.append([self.step, train_loss, valid_loss])
        self.run_loss, self.run_steps = 0.0, 0

    def add_valid(self, loss_sum: torch.Tensor, valid_loss: float | None, patience: int) -> bool:
        """A history point with a validation loss; True when it is the best so far. Counts towards early stopping."""
        self.add_point(loss_sum, valid_loss)
        if valid_loss is None:
            return False
        if self.best_valid_loss is None or valid_loss < self.best_valid_loss:
            self.best_valid_loss, self.best_step, self.bad_evals = valid_loss, self.step, 0
            return True
        self.bad_evals += 1
        self.stopped_early = self.bad_evals >= patience
        return False


def run_fingerprint(config: Config, vocab_size: int, build_key: str | None) -> dict:
    """What a checkpoint must match to be resumed: the model and train fields not declared `on_resume="may change"`
    (couplet/core/config.py), the vocabulary size and the build."""
    sections = {name: {k: v for k, v in getattr(config, name).model_dump().items() if k not in may_change_on_resume(name)}
                for name in ("model", "train")}
    return {**sections, "vocab_size": vocab_size, "build_key": build_key}


def _as_now(fingerprint):
    """A checkpoint's fingerprint with each model/train field it lacks at the field's `former` value: a checkpoint
    written before a field existed was made with the former behaviour (e.g. model.directions 1, no swapped pairs)."""
    if not isinstance(fingerprint, dict):
        return fingerprint
    filled = with_former_defaults(fingerprint)
    for name in ("model", "train"):
        if isinstance(filled.get(name), dict):
            filled[name] = {k: v for k, v in filled[name].items() if k not in may_change_on_resume(name)}
    return filled


def save_checkpoint(path: Path, *, fingerprint: dict, config: Config, model, optimizer, batches, best_weights: dict | None,
                    progress: TrainState, device: torch.device, ema=None) -> None:
    """Write the full state of a run to `path`, atomically."""
    state = {
        "fingerprint": fingerprint, "config": config.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "data": batches.state_dict(), "best_weights": best_weights,
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
        "progress": dataclasses.asdict(progress),
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, fingerprint: dict) -> dict | None:
    """The checkpoint at `path` if it exists, reads, and was made by the same run configuration, else None."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — truncated, or not a checkpoint at all: a fresh start beats a traceback
        log.warning("ignoring %s: cannot read it (%s); training from scratch", path, one_line(exc))
        return None
    if not isinstance(ckpt, dict) or _as_now(ckpt.get("fingerprint")) != fingerprint:
        log.warning("ignoring %s: it was written with another config or dataset; training from scratch", path)
        return None
    return ckpt


def restore(ckpt: dict, model, optimizer, batches, device: torch.device, ema=None) -> tuple[TrainState, dict | None]:
    """Load a checkpoint into a run's model, optimiser and batches (and the RNG); returns its progress and
    best weights. Raises on a checkpoint of another layout, possibly after loading part of it."""
    progress = TrainState(**ckpt["progress"])
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    batches.load_state_dict(ckpt["data"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return progress, ckpt["best_weights"]


def one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
