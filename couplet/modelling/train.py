"""Train the couplet labeller on a build directory and write a model directory.

Reads top to bottom like nanoGPT's train.py, as functions: setup, data, model, optimiser, resume, an eval
helper, the loop, then the outputs. A run is resumable: every `checkpoint_every` steps the full state
(weights, optimiser, data position, RNG, best-so-far, and the `TrainState`: step, history, early-stopping
count, timings; see couplet/modelling/checkpoint.py) goes to `model_dir/checkpoints/last.pt`, and a later call with
the same config carries on from there and ends exactly where an uninterrupted run ends. Probe lines, the
progress bar and the loss curve are in couplet/modelling/progress.py. With train.nproc > 1 the same loop runs in every
rank of a torchrun job (DistributedDataParallel; couplet/modelling/distributed.py says how batches, decisions and
checkpoints are shared); with nproc 1 no process group is started and couplet.modelling.distributed is never loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from couplet.core.atomic import atomic_write_json
from couplet.core.catalog import MODEL_FILES, PROBE_LINES, Catalog
from couplet.modelling.checkpoint import (
    TrainState,
    load_checkpoint,
    one_line,
    restore,
    run_fingerprint,
    save_checkpoint,
)
from couplet.core.config import Config
from couplet.data.batches import LengthBucketBatches, count_rows, load_split, read_manifest
from couplet.core.locks import hold_lock
from couplet.modelling.model import build_labeller, save_labeller
from couplet.modelling.progress import append_samples, argmax_lines, progress_bar, write_curve
from couplet.core.stage import run_cached, stage_key
from couplet.data.vocab import PAD, Vocab

log = logging.getLogger("couplet.modelling.train")


class TrainingInterrupted(RuntimeError):
    """Raised by `train_labeller(..., stop_after=n)`: simulates a kill after step n (tests of resume)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, and slow."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_matmul_slowdown(size: int = 256, repeats: int = 20) -> float:
    """How many times slower a bf16 matmul is than an fp32 one on this CPU (a ~0.1 s measurement)."""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            x @ y
        return time.perf_counter() - start

    return seconds(torch.bfloat16) / seconds(torch.float32)


def resolve_cpu_bf16(setting: str | bool) -> bool:
    """train.cpu_bf16: "auto" is on only with native bf16; forcing it on without warns with the measured cost."""
    native = native_cpu_bf16()
    if setting == "auto":
        return native
    if setting and not native:
        log.warning("train.cpu_bf16=true on a CPU without native bf16: a bf16 matmul is %.0fx slower than fp32 here, "
                    "so training will be slower (auto would use fp32)", bf16_matmul_slowdown())
    return bool(setting)


def make_autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA (and on CPU when asked); fp32 weights and softmax either way."""
    if device.type == "cuda" or cpu_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # fused: one kernel per parameter for the whole update (CPU and CUDA); on CPU 1.2 ms vs 4.1 ms (foreach)
    # and 7.4 ms (for-loop) per step for the seed model, measured single-threaded
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def train_step(model, optimizer, up: torch.Tensor, down: torch.Tensor, autocast) -> torch.Tensor:
    """One optimiser step on a batch; returns the detached loss (no device sync)."""
    with autocast:
        _, loss = model(up, targets=down)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def estimate_loss(model, buckets, device, autocast, rows: int = 256) -> float | None:
    """Mean cross-entropy per non-PAD token over every couplet in `buckets` (eval mode: no dropout)."""
    if not buckets:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for up, down in buckets.values():
        for s in range(0, len(up), rows):
            u, d = torch.from_numpy(up[s : s + rows]).to(device), torch.from_numpy(down[s : s + rows]).to(device)
            with autocast:
                _, loss = model(u, targets=d)
            n = int((d != PAD).sum())
            total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def _build(config: Config, vocab_size: int, device: torch.device):
    """A freshly initialised model (seeded), its optimiser, and its weight average (None without train.ema_decay)."""
    torch.manual_seed(config.train.seed)
    model = build_labeller(vocab_size, config.model).to(device)
    ema = None
    if config.train.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(model, multi_avg_fn=ema_update(config.train.ema_decay))
    return model, make_optimizer(model, config.train.lr), ema


def ema_update(decay: float):
    """The moving average's update, with its decay warmed up as min(decay, (1 + n) / (10 + n)) after n updates.

    A fixed 0.999 would keep a short run's average at its random start; the warm-up makes the average follow
    early on and reaches `decay` by itself (after ~9,000 updates for 0.999), so long runs are unaffected.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def warmup_steps(tc, total_steps: int) -> int:
    """train.warmup_steps, at most a tenth of the run's steps (a short run is not all warm-up)."""
    return min(tc.warmup_steps, total_steps // 10)


def lr_factor(tc, step: int, total_steps: int, train_seconds: float) -> float:
    """The learning-rate multiplier at `step`: 1 (constant), or linear warm-up then cosine decay to 0.

    The run's progress is its share of steps or, under train.max_minutes, of the time budget, whichever is further.
    """
    if tc.lr_schedule == "constant":
        return 1.0
    warmup = warmup_steps(tc, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total_steps - warmup)
    if tc.max_minutes:
        done = max(done, train_seconds / (60 * tc.max_minutes))
    return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _validate(model, valid, device, autocast, patience: int, state: TrainState, loss_sum, best_weights: dict | None) -> dict | None:
    """Validation pass: a history point, the early-stopping count; returns the best weights so far (on CPU)."""
    if state.add_valid(loss_sum, estimate_loss(model, valid, device, autocast), patience):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return best_weights


def train_labeller(build_dir: Path, config: Config, model_dir: Path, *, progress: bool = True, stop_after: int | None = None,
                   ranks=None) -> dict:
    """Train on `build_dir`'s train split (valid for early stopping) and write `model_dir`.

    Returns a summary: model_dir, steps, epochs, best_valid_loss, tokens_per_s, seconds, device, resumed_from.
    `stop_after` (tests only) raises TrainingInterrupted after that global step, as a kill would.
    With train.nproc > 1 (and no `ranks`) the run is handed to torchrun (couplet.modelling.distributed.launch_training),
    whose workers call this again with their `ranks` (a couplet.modelling.distributed.Ranks); rank 0 writes `model_dir`.
    """
    tc = config.train
    build_dir, model_dir = Path(build_dir), Path(model_dir)
    if tc.nproc > 1 and ranks is None:
        if stop_after is not None:
            raise ValueError("stop_after is for single-process runs (train.nproc=1)")
        from couplet.modelling.distributed import launch_training

        return launch_training(build_dir, config, model_dir, progress=progress)
    previous_threads = torch.get_num_threads()
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    try:
        return _train(build_dir, config, model_dir, progress, stop_after, ranks)
    finally:
        torch.set_num_threads(previous_threads)


def _train(build_dir: Path, config: Config, model_dir: Path, progress: bool, stop_after: int | None, ranks=None) -> dict:
    tc = config.train
    started = time.perf_counter()
    device = pick_device(tc.device)
    main, world = (True, 1) if ranks is None else (ranks.is_main, ranks.world)  # main: the process that writes
    if ranks is not None:
        device = ranks.place(device)
        ranks.check_batch(tc.batch_size)
    autocast = make_autocast(device, device.type == "cpu" and resolve_cpu_bf16(tc.cpu_bf16))
    if main:
        model_dir.mkdir(parents=True, exist_ok=True)

    # data
    manifest = read_manifest(build_dir)
    vocab = Vocab.load(build_dir / "vocab.json")
    train = load_split(build_dir, "train", tc.max_len)
    valid = load_split(build_dir, "valid", tc.max_len)
    batches = LengthBucketBatches(train, tc.batch_size, seed=tc.seed)
    steps_per_epoch = len(batches)
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch
    log_every = max(1, min(100, steps_per_epoch // 10))  # train-loss points in the history

    # model and optimiser, then resume or start fresh
    ckpt_path, samples_path = model_dir / MODEL_FILES.checkpoint, model_dir / MODEL_FILES.samples
    fingerprint = run_fingerprint(config, len(vocab), manifest.get("key"))
    model, optimizer, ema = _build(config, len(vocab), device)
    state, best_weights, resumed_from = TrainState(), None, None
    ckpt = load_checkpoint(ckpt_path, fingerprint) if main else None
    if ranks is not None:
        ckpt = ranks.broadcast_object(ckpt)  # read once, by rank 0: every rank resumes from the same state
    if ckpt is not None:
        try:
            state, best_weights = restore(ckpt, model, optimizer, batches, device, ema)
            resumed_from = state.step
            log.info("resuming from %s at step %d", ckpt_path, state.step)
        except Exception as exc:  # noqa: BLE001 — a checkpoint of another layout: start over (it may have been half loaded)
            log.warning("ignoring %s: cannot resume from it (%s); training from scratch", ckpt_path, one_line(exc))
            model, optimizer, ema = _build(config, len(vocab), device)
            batches = LengthBucketBatches(train, tc.batch_size, seed=tc.seed)
            state = TrainState()
    if resumed_from is None and main:
        samples_path.unlink(missing_ok=True)
    step_model = model
    if ranks is not None:
        ranks.seed_dropout(tc.seed, state.step)
        ranks.seconds = state.train_seconds
        step_model = ranks.wrap(model)
    step_model = torch.compile(step_model) if tc.compile else step_model
    loss_sum = torch.zeros((), device=device)  # train loss since the last flush, summed on the device
    tokens, step_seconds = 0, 0.0  # this call's tokens trained and time in steps (not evals or checkpoints)
    kept = ema.module if ema is not None else model  # the weights validated, kept and saved
    validate = functools.partial(_validate, kept, valid, device, autocast, tc.patience, state, loss_sum)
    if not main:
        validate = lambda best_weights: best_weights  # noqa: E731 — rank 0 validates; agree() shares its decision
    budget_s = 60 * tc.max_minutes if tc.max_minutes else math.inf
    out_of_time = False

    def checkpoint() -> None:
        if not main:
            return
        state.flush(loss_sum)
        so_far = dataclasses.replace(state, seconds=state.seconds + time.perf_counter() - started,
                                     tokens=state.tokens + tokens, train_seconds=state.train_seconds + step_seconds)
        save_checkpoint(ckpt_path, fingerprint=fingerprint, config=config, model=model, optimizer=optimizer,
                        batches=batches, best_weights=best_weights, progress=so_far, device=device, ema=ema)

    # the loop
    bar = progress_bar(total_steps, state.step, progress and main)
    model.train()
    try:
        while state.step < total_steps and not state.stopped_early and not out_of_time:
            tick = time.perf_counter()
            for up, down in batches:
                if ranks is not None:
                    up, down = ranks.shard(up, down)  # this rank's slice of the global batch
                up, down = up.to(device, non_blocking=True), down.to(device, non_blocking=True)
                if tc.lr_schedule != "constant":
                    clock = state.train_seconds + step_seconds if ranks is None else ranks.seconds  # rank 0's, shared
                    factor = lr_factor(tc, state.step, total_steps, clock)
                    for group in optimizer.param_groups:
                        group["lr"] = tc.lr * factor
                loss = train_step(step_model, optimizer, up, down, autocast)
                if ema is not None:
                    ema.update_parameters(model)
                loss_sum += loss
                state.step += 1
                state.run_steps += 1
                tokens += up.numel() * world  # non-PAD tokens of the global batch: equal-length, never padded
                step_seconds += time.perf_counter() - tick
                if bar is not None:
                    bar.update(1)
                    if state.step % 10 == 0:
                        bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{tokens / max(step_seconds, 1e-9):,.0f}")
                if state.step % log_every == 0:
                    state.add_point(loss_sum)
                if tc.eval_every and state.step % tc.eval_every == 0:
                    best_weights = validate(best_weights)
                if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                    checkpoint()
                if stop_after is not None and state.step >= stop_after:
                    raise TrainingInterrupted(f"stopped after step {state.step} (stop_after)")
                out_of_time = state.train_seconds + step_seconds >= budget_s
                if ranks is not None:  # stop only where every rank learns of it: rank 0's decisions, at sync points
                    sync = state.step % ranks.sync_every == 0 or bool(tc.eval_every and state.step % tc.eval_every == 0)
                    out_of_time = sync and ranks.agree(state, out_of_time, state.train_seconds + step_seconds)
                if state.step >= total_steps or state.stopped_early or out_of_time:
                    break
                tick = time.perf_counter()
            if batches.position == 0:  # the epoch ran to its end
                if not tc.eval_every:
                    best_weights = validate(best_weights)
                if ranks is not None:
                    out_of_time = ranks.agree(state, state.train_seconds + step_seconds >= budget_s, state.train_seconds + step_seconds)
                if main:
                    title = f"epoch {batches.epoch} · step {state.step}"
                    append_samples(samples_path, title, PROBE_LINES, argmax_lines(kept, vocab, PROBE_LINES, device), progress)
    except BaseException as exc:
        lost = ranks is not None and ranks.peer_lost(exc)  # a collective failed: before the optimizer step, state whole
        if (isinstance(exc, Exception) and not lost) or tokens == 0:
            raise  # an error: the state may be inconsistent, the last periodic checkpoint stays
        # SIGINT (KeyboardInterrupt), SIGTERM (Prefect's TerminationSignal) or a lost rank: keep what this run trained
        checkpoint()  # rank 0's only, under torchrun
        if main:
            how = "another rank is gone" if lost else "interrupted"
            log.warning("%s at step %d: checkpoint saved to %s; the next run resumes from it", how, state.step, ckpt_path)
        raise
    finally:
        if bar is not None:
            bar.close()

    if not main:  # rank 0 writes the outputs
        return {"model_dir": str(model_dir), "rank": ranks.rank, "steps": state.step}

    # outputs: best weights, config, vocab, metrics, curve, final samples
    if not state.history or state.history[-1][2] is None or state.history[-1][0] != state.step:
        best_weights = validate(best_weights)  # the last steps were never validated
    final_train_loss = next((t for _, t, _ in reversed(state.history) if t is not None), None)
    if best_weights is not None:
        kept.load_state_dict(best_weights)
    save_labeller(kept, vocab, config, model_dir)
    append_samples(samples_path, f"final · best weights (step {state.best_step or state.step})", PROBE_LINES,
                   argmax_lines(kept, vocab, PROBE_LINES, device), progress)
    all_tokens, all_step_seconds = state.tokens + tokens, state.train_seconds + step_seconds
    metrics = {
        "steps": state.step,
        "epochs": round(state.step / steps_per_epoch, 3),
        "steps_per_epoch": steps_per_epoch,
        "best_valid_loss": state.best_valid_loss,
        "best_step": state.best_step,
        "final_train_loss": final_train_loss,
        "stopped_early": state.stopped_early,
        "out_of_time": out_of_time,
        "tokens_per_s": round(tokens / step_seconds, 1) if step_seconds else None,  # this call's steps
        "tokens_per_s_overall": round(all_tokens / all_step_seconds, 1) if all_step_seconds else None,
        "seconds": round(state.seconds + time.perf_counter() - started, 2),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "processes": world,  # train.nproc (torchrun ranks); tokens_per_s counts every rank's tokens
        "resumed_from": resumed_from,
        "train_rows": count_rows(train),
        "valid_rows": count_rows(valid),
        "vocab_size": len(vocab),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_key": manifest.get("key"),
        "history": state.history,
    }
    atomic_write_json(model_dir / MODEL_FILES.metrics, metrics)
    write_curve(model_dir / MODEL_FILES.curve, state.history)
    return {"model_dir": str(model_dir), **{k: metrics[k] for k in ("steps", "epochs", "best_valid_loss", "tokens_per_s", "seconds", "device", "resumed_from")}}


def fit_lower_line_lm(build_dir: Path, model_dir: Path) -> None:
    """The lower-line bigram LM of the build's train split, for decode.lm_weight: model_dir/lm.npz (a few seconds)."""
    from couplet.data.build import read_split_text
    from couplet.decoding.lm import CharBigramLM

    vocab = Vocab.load(model_dir / MODEL_FILES.vocab)
    CharBigramLM.fit(read_split_text(build_dir, "train")[1], vocab).save(model_dir / MODEL_FILES.lm)


# --------------------------------------------------------------------------- stage 4


def run_train(built: dict, config: Config, home: Path, force: bool = False, progress: bool = True) -> dict:
    """Stage 4: train the labeller on the build's shards into models/<run-id>/ (resumes a killed run)."""
    key = stage_key("train", built["key"], config.section_hash("model", "train"))
    run_id = f"{built['dataset_version']}-{key[:8]}"
    model_dir = Catalog(home).model_dir(run_id)

    def produce(folder: Path) -> dict:
        summary = train_labeller(Path(built["build_dir"]), config, folder, progress=progress)
        fit_lower_line_lm(Path(built["build_dir"]), folder)
        return {
            "run_id": run_id,
            "model": Catalog(home).relative(model_dir),  # relative to the home, like every record under it
            "build_key": built["key"],
            "dataset_version": built["dataset_version"],
            "training": {k: v for k, v in summary.items() if k != "model_dir"},
        }

    with hold_lock(home, f"models/{run_id}"):
        if force:
            shutil.rmtree(model_dir / MODEL_FILES.checkpoints, ignore_errors=True)
        trained = run_cached("train", key, model_dir, produce, force=force, manifest_name=MODEL_FILES.train_manifest,
                             outputs=(*MODEL_FILES.required, MODEL_FILES.lm), in_place=True)
    return Catalog(home).resolved(trained, ("model",))  # under the current home, as the other run_<stage> hand back
