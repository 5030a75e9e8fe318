"""The training loop of one process: the whole run (train.nproc 1), or one rank of a torchrun job.

Reads top to bottom like nanoGPT's train.py, as the methods of `Trainer`: setup, data, model, resume, the
loop, then the outputs; the step's pieces (device, optimiser, schedule, weight average, validation loss) are
in couplet/modelling/step.py. A run is resumable: every `checkpoint_every` steps the full state (weights,
optimiser, data position, RNG, best-so-far, and the `TrainState`: step, history, early-stopping count,
timings; see couplet/modelling/checkpoint.py) goes to `model_dir/checkpoints/last.pt`, and a later call with
the same config carries on from there and ends exactly where an uninterrupted run ends. Probe lines, the
progress bar and the loss curve are in couplet/modelling/progress.py.

A rank of a multi-process run differs from a lone process in a few named places, the methods of its `Place`:
`OneProcess` here, couplet.modelling.distributed.Ranks under torchrun (which calls `train_in_process` with
one; this module never imports it):
- `is_main`: the process that validates and writes (checkpoints, probe lines, the model folder);
- `shard`: this process's rows of each global batch;
- `agree`: a sync point, where rank 0's decisions (stop early, out of time) and clock reach every rank;
- `broadcast_object` (the checkpoint, read by rank 0), `wrap` (DDP), `seed_dropout`, `peer_lost`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Protocol

import torch

from couplet.core.atomic import atomic_write_json
from couplet.core.catalog import MODEL_FILES, PROBE_LINES
from couplet.core.config import Config, ConfigError
from couplet.data.batches import LengthBucketBatches, count_rows, load_split, one_way, with_swaps
from couplet.data.build import read_build_manifest, read_build_vocab
from couplet.modelling.checkpoint import TrainState, load_checkpoint, one_line, restore, run_fingerprint, save_checkpoint
from couplet.modelling.model import save_labeller
from couplet.modelling.progress import append_samples, argmax_lines, progress_bar, write_curve
from couplet.modelling.step import (
    build_model,
    estimate_loss,
    lr_factor,
    make_autocast,
    pick_device,
    resolve_cpu_bf16,
    train_step,
)

log = logging.getLogger("couplet.modelling.train")


class TrainingInterrupted(RuntimeError):
    """Raised by `train_labeller(..., stop_after=n)`: simulates a kill after step n (tests of resume)."""


class Place(Protocol):
    """This process's place in the run and what it shares with the others."""

    rank: int
    world: int  # processes in the run
    is_main: bool  # rank 0: validates and writes
    sync_every: int  # steps between sync points (besides validation steps and epoch ends)
    seconds: float  # the clock the schedule reads: rank 0's time in train steps at the last sync point

    def device_for(self, device: torch.device) -> torch.device: ...  # this process's device (a rank's own GPU)
    def check_batch(self, batch_size: int) -> None: ...  # raises when the global batch cannot be split evenly
    def shard(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]: ...  # its rows of each (up, down[, direction])
    def seed_dropout(self, seed: int, step: int) -> None: ...  # ranks but 0 draw their own dropout masks
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...  # the model that steps (DDP: shares gradients)
    def broadcast_object(self, obj): ...  # rank 0's `obj`, on every rank
    def agree(self, state: TrainState, out_of_time: bool, seconds: float) -> bool: ...  # rank 0's decisions, shared
    def peer_lost(self, exc: BaseException) -> bool: ...  # whether `exc` is a collective failing: a rank is gone


class OneProcess:
    """The place of a process that is the whole run: rank 0 of 1, writes everything, shares nothing."""

    rank, world, is_main = 0, 1, True
    sync_every = 1  # alone, every step is a sync point: a decision takes effect at once

    def __init__(self) -> None:
        self.seconds = 0.0

    def device_for(self, device: torch.device) -> torch.device:
        return device

    def check_batch(self, batch_size: int) -> None:
        pass  # any batch size is one process's batch

    def shard(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return batch

    def seed_dropout(self, seed: int, step: int) -> None:
        pass  # the RNG stream stays the one seeded or restored

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def broadcast_object(self, obj):
        return obj

    def agree(self, state: TrainState, out_of_time: bool, seconds: float) -> bool:
        self.seconds = seconds  # the clock is this process's own
        return out_of_time

    def peer_lost(self, exc: BaseException) -> bool:
        return False


def train_in_process(build_dir: Path, config: Config, model_dir: Path, *, progress: bool = True,
                     stop_after: int | None = None, place: Place | None = None) -> dict:
    """Train on `build_dir`'s train split (valid for early stopping) in this process and write `model_dir`.

    `place` is this process's rank in a torchrun job (a couplet.modelling.distributed.Ranks; rank 0 writes
    `model_dir`), or None when this process is the whole run. Returns a summary: model_dir, steps, epochs,
    best_valid_loss, tokens_per_s, seconds, device, resumed_from (other ranks: model_dir, rank, steps).
    `stop_after` (tests only) raises TrainingInterrupted after that global step, as a kill would.
    """
    previous_threads = torch.get_num_threads()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    try:
        return Trainer(Path(build_dir), config, Path(model_dir), place or OneProcess(), progress).run(stop_after)
    finally:
        torch.set_num_threads(previous_threads)


class Trainer:
    """One call's training in this process: set up (resuming when it can) on creation, then `run`."""

    def __init__(self, build_dir: Path, config: Config, model_dir: Path, place: Place, progress: bool):
        self.started = time.perf_counter()
        self.config, self.tc, self.model_dir, self.place, self.progress = config, config.train, model_dir, place, progress
        if self.tc.swapped_pairs and config.model.directions != 2:  # a check across sections: where training starts
            raise ConfigError(f"train.swapped_pairs=true needs model.directions=2 (got {config.model.directions}): "
                              "set model.directions=2, or train.swapped_pairs=false")
        self.device = place.device_for(pick_device(self.tc.device))
        place.check_batch(self.tc.batch_size)
        self.autocast = make_autocast(self.device, self.device.type == "cpu" and resolve_cpu_bf16(self.tc.cpu_bf16))
        if place.is_main:
            model_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path, self.samples_path = model_dir / MODEL_FILES.checkpoint, model_dir / MODEL_FILES.samples
        self._load_data(build_dir)
        self._start_or_resume()
        place.seed_dropout(self.tc.seed, self.state.step)
        place.seconds = self.state.train_seconds
        step_model = place.wrap(self.model)
        self.step_model = torch.compile(step_model) if self.tc.compile else step_model
        self.kept = self.ema.module if self.ema is not None else self.model  # the weights validated, kept and saved
        self.loss_sum = torch.zeros((), device=self.device)  # train loss since the last flush, summed on the device
        self.tokens, self.step_seconds = 0, 0.0  # this call's tokens trained and time in steps (not evals or checkpoints)
        self.budget_s = 60 * self.tc.max_minutes if self.tc.max_minutes else math.inf
        self.out_of_time = False

    def _load_data(self, build_dir: Path) -> None:
        tc = self.tc
        self.manifest = read_build_manifest(build_dir)
        self.vocab = read_build_vocab(build_dir)
        tags = self._word_tags()
        self.train_split = load_split(build_dir, "train", tc.max_len, tags)
        self.valid_split = load_split(build_dir, "valid", tc.max_len, tags)  # validated upper -> lower only, swaps or not
        # with train.swapped_pairs every pair's swap too (direction "up"): twice the batches per epoch
        self.train_buckets = with_swaps(self.train_split) if tc.swapped_pairs else self._one_way(self.train_split)
        # the build's extra pairs (data.extra_source), train.extra_share of each epoch's rows, swapped like the others
        extra = load_split(build_dir, "extra", tc.max_len, tags) if tc.extra_share else {}
        self.extra_buckets = with_swaps(extra) if tc.swapped_pairs else self._one_way(extra)
        self.extra_rows = count_rows(extra)
        if extra:
            log.info("extra source: %d pairs, %.0f%% of each epoch's rows", self.extra_rows, 100 * tc.extra_share)
        self.batches = self._new_batches()
        self.steps_per_epoch = len(self.batches)
        self.total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * self.steps_per_epoch
        self.log_every = max(1, min(100, self.steps_per_epoch // 10))  # train-loss points in the history

    def _word_tags(self) -> bool:
        """Whether batches carry the input line's word tags (model.word_features); the build must have stored them."""
        if not self.config.model.word_features:
            return False
        if not self.manifest.get("params", {}).get("word_tags"):
            raise ConfigError("model.word_features=true reads the build's word tags, and this build has none: "
                              "set data.word_tags=true too")
        return True

    def _one_way(self, buckets):
        """Without swaps: tagged buckets get a direction column (all "down") before their tags, as with_swaps' have."""
        return one_way(buckets) if self.config.model.word_features else buckets

    def _new_batches(self) -> LengthBucketBatches:
        return LengthBucketBatches(self.train_buckets, self.tc.batch_size, seed=self.tc.seed, extra=self.extra_buckets,
                                   extra_share=self.tc.extra_share)

    def _start_or_resume(self) -> None:
        """A fresh model and optimiser (seeded), then the last checkpoint's state when it is this config's."""
        self.fingerprint = run_fingerprint(self.config, len(self.vocab), self.manifest.get("key"))
        self.model, self.optimizer, self.ema = build_model(self.config, len(self.vocab), self.device)
        self.state, self.best_weights, self.resumed_from = TrainState(), None, None
        ckpt = load_checkpoint(self.ckpt_path, self.fingerprint) if self.place.is_main else None
        ckpt = self.place.broadcast_object(ckpt)  # read once, by rank 0: every rank resumes from the same state
        if ckpt is not None:
            try:
                self.state, self.best_weights = restore(ckpt, self.model, self.optimizer, self.batches, self.device, self.ema)
                self.resumed_from = self.state.step
                log.info("resuming from %s at step %d", self.ckpt_path, self.state.step)
            except Exception as exc:  # noqa: BLE001 — a checkpoint of another layout: start over (it may have been half loaded)
                log.warning("ignoring %s: cannot resume from it (%s); training from scratch", self.ckpt_path, one_line(exc))
                self.model, self.optimizer, self.ema = build_model(self.config, len(self.vocab), self.device)
                self.batches = self._new_batches()
                self.state = TrainState()
        if self.resumed_from is None and self.place.is_main:
            self.samples_path.unlink(missing_ok=True)

    # ----------------------------------------------------------------------- the loop

    def run(self, stop_after: int | None = None) -> dict:
        """Train to the end (steps, early stopping or time budget), then write the outputs (rank 0)."""
        self.bar = progress_bar(self.total_steps, self.state.step, self.progress and self.place.is_main)
        self.model.train()
        try:
            while not self._finished():
                self._train_epoch(stop_after)
        except BaseException as exc:
            self._checkpoint_on_stop(exc)
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
        if not self.place.is_main:  # rank 0 writes the outputs
            return {"model_dir": str(self.model_dir), "rank": self.place.rank, "steps": self.state.step}
        return self._write_outputs()

    def _finished(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped_early or self.out_of_time

    def _train_epoch(self, stop_after: int | None) -> None:
        """Steps to the epoch's end (then its validation and probe lines) or until the run is finished."""
        tick = time.perf_counter()  # a step's time includes fetching its batch
        for batch in self.batches:  # (up, down), with swapped pairs (up, down, direction), with word tags (.., direction, tags)
            loss = self._step(*batch)
            self.step_seconds += time.perf_counter() - tick
            self._after_step(loss, stop_after)
            if self._finished():
                break
            tick = time.perf_counter()
        if self.batches.position == 0:  # the epoch ran to its end
            self._end_epoch()

    def _step(self, *batch: torch.Tensor) -> torch.Tensor:
        batch = self.place.shard(*batch)  # this rank's slice of the global batch
        up, down, *rest = (t.to(self.device, non_blocking=True) for t in batch)
        direction, tags = (rest + [None, None])[:2]  # each row's direction and, with model.word_features, input tags
        if self.tc.lr_schedule != "constant":
            factor = lr_factor(self.tc, self.state.step, self.total_steps, self.place.seconds)  # rank 0's clock
            for group in self.optimizer.param_groups:
                group["lr"] = self.tc.lr * factor
        loss = train_step(self.step_model, self.optimizer, up, down, self.autocast, direction, tags)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.loss_sum += loss
        self.state.step += 1
        self.state.run_steps += 1
        self.tokens += up.numel() * self.place.world  # non-PAD tokens of the global batch: equal-length, never padded
        return loss

    def _after_step(self, loss: torch.Tensor, stop_after: int | None) -> None:
        """The step's bookkeeping: progress bar, history, validation, checkpoint, and whether time is up."""
        step, tc = self.state.step, self.tc
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{self.tokens / max(self.step_seconds, 1e-9):,.0f}")
        if step % self.log_every == 0:
            self.state.add_point(self.loss_sum)
        validates = bool(tc.eval_every and step % tc.eval_every == 0)
        if validates:
            self._validate()
        if tc.checkpoint_every and step % tc.checkpoint_every == 0:
            self._checkpoint()
        if stop_after is not None and step >= stop_after:
            raise TrainingInterrupted(f"stopped after step {step} (stop_after)")
        # stop only where every rank learns of it: rank 0's decisions, at sync points
        self.out_of_time = (step % self.place.sync_every == 0 or validates) and self._agree()

    def _end_epoch(self) -> None:
        if not self.tc.eval_every:
            self._validate()
        self.out_of_time = self._agree()
        if self.place.is_main:
            title = f"epoch {self.batches.epoch} · step {self.state.step}"
            append_samples(self.samples_path, title, PROBE_LINES, self._probe(), self.progress)

    def _agree(self) -> bool:
        """A sync point: rank 0's early stopping, budget and clock reach every rank; returns whether time is up."""
        seconds = self._train_seconds()
        return self.place.agree(self.state, seconds >= self.budget_s, seconds)

    def _train_seconds(self) -> float:
        """Time in train steps of this call and the calls it resumes: the time budget's clock."""
        return self.state.train_seconds + self.step_seconds

    def _validate(self) -> None:
        """Rank 0's validation pass: a history point, the early-stopping count, the best weights so far (on CPU)."""
        if not self.place.is_main:
            return  # agree() shares rank 0's decision
        valid_loss = estimate_loss(self.kept, self.valid_split, self.device, self.autocast)
        if self.state.add_valid(self.loss_sum, valid_loss, self.tc.patience):
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.kept.state_dict().items()}

    def _probe(self) -> list[str]:
        return argmax_lines(self.kept, self.vocab, PROBE_LINES, self.device)

    def _checkpoint(self) -> None:
        """Rank 0 saves the full state to checkpoints/last.pt (the global batch position: no per-rank state)."""
        if not self.place.is_main:
            return
        state = self.state
        state.flush(self.loss_sum)
        so_far = dataclasses.replace(state, seconds=state.seconds + time.perf_counter() - self.started,
                                     tokens=state.tokens + self.tokens, train_seconds=self._train_seconds())
        save_checkpoint(self.ckpt_path, fingerprint=self.fingerprint, config=self.config, model=self.model,
                        optimizer=self.optimizer, batches=self.batches, best_weights=self.best_weights,
                        progress=so_far, device=self.device, ema=self.ema)

    def _checkpoint_on_stop(self, exc: BaseException) -> None:
        """SIGINT (KeyboardInterrupt), SIGTERM (Prefect's TerminationSignal) or a lost rank: keep what this call
        trained. An error writes nothing: the state may be inconsistent, the last periodic checkpoint stays."""
        lost = self.place.peer_lost(exc)  # a collective failed: before the optimizer step, the state is whole
        if (isinstance(exc, Exception) and not lost) or self.tokens == 0:
            return
        self._checkpoint()  # rank 0's only, under torchrun
        if self.place.is_main:
            how = "another rank is gone" if lost else "interrupted"
            log.warning("%s at step %d: checkpoint saved to %s; the next run resumes from it", how, self.state.step, self.ckpt_path)

    # ----------------------------------------------------------------------- outputs (rank 0)

    def _write_outputs(self) -> dict:
        """The best weights, config, vocab, metrics, curve and final probe lines; returns the call's summary."""
        state = self.state
        if not state.history or state.history[-1][2] is None or state.history[-1][0] != state.step:
            self._validate()  # the last steps were never validated
        if self.best_weights is not None:
            self.kept.load_state_dict(self.best_weights)
        save_labeller(self.kept, self.vocab, self.config, self.model_dir)
        append_samples(self.samples_path, f"final · best weights (step {state.best_step or state.step})", PROBE_LINES,
                       self._probe(), self.progress)
        metrics = self._metrics()
        atomic_write_json(self.model_dir / MODEL_FILES.metrics, metrics)
        write_curve(self.model_dir / MODEL_FILES.curve, state.history)
        summary_keys = ("steps", "epochs", "best_valid_loss", "tokens_per_s", "seconds", "device", "resumed_from")
        return {"model_dir": str(self.model_dir), **{k: metrics[k] for k in summary_keys}}

    def _metrics(self) -> dict:
        state, tokens, step_seconds = self.state, self.tokens, self.step_seconds
        all_tokens, all_step_seconds = state.tokens + tokens, self._train_seconds()
        return {
            "steps": state.step,
            "epochs": round(state.step / self.steps_per_epoch, 3),
            "steps_per_epoch": self.steps_per_epoch,
            "best_valid_loss": state.best_valid_loss,
            "best_step": state.best_step,
            "final_train_loss": next((t for _, t, _ in reversed(state.history) if t is not None), None),
            "stopped_early": state.stopped_early,
            "out_of_time": self.out_of_time,
            "tokens_per_s": round(tokens / step_seconds, 1) if step_seconds else None,  # this call's steps
            "tokens_per_s_overall": round(all_tokens / all_step_seconds, 1) if all_step_seconds else None,
            "seconds": round(state.seconds + time.perf_counter() - self.started, 2),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "processes": self.place.world,  # train.nproc (torchrun ranks); tokens_per_s counts every rank's tokens
            "resumed_from": self.resumed_from,
            "train_rows": count_rows(self.train_split),
            "valid_rows": count_rows(self.valid_split),
            "extra_rows": self.extra_rows,  # the build's extra pairs that training draws from (0: none, or extra_share 0)
            "vocab_size": len(self.vocab),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "build_key": self.manifest.get("key"),
            "history": state.history,
        }
