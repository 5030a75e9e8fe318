"""One training step and what it needs: the device and its precision, the model with its optimiser and weight
average, the learning-rate schedule, and the validation loss. The loop that runs them is
couplet/modelling/loop.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch

from couplet.core.config import Config, TrainConfig
from couplet.data.vocab import PAD
from couplet.modelling.model import build_labeller

log = logging.getLogger("couplet.modelling.train")


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


def build_model(config: Config, vocab_size: int, device: torch.device):
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


def warmup_steps(tc: TrainConfig, total_steps: int) -> int:
    """train.warmup_steps, at most a tenth of the run's steps (a short run is not all warm-up)."""
    return min(tc.warmup_steps, total_steps // 10)


def lr_factor(tc: TrainConfig, step: int, total_steps: int, train_seconds: float) -> float:
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


def train_step(model, optimizer, up: torch.Tensor, down: torch.Tensor, autocast, direction: torch.Tensor | None = None,
               tags: torch.Tensor | None = None) -> torch.Tensor:
    """One optimiser step on a batch (`direction` (B,): each row's, for swapped pairs; `tags` (B, L): the input
    line's word tags, model.word_features); returns the detached loss (no device sync)."""
    extra = {"direction": direction} if direction is not None else {}
    if tags is not None:
        extra["tags"] = tags
    with autocast:
        _, loss = model(up, targets=down, **extra)
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
    for up, down, *tagged in buckets.values():  # tagged (load_split(..., tags=True)): the upper line's tags first
        for s in range(0, len(up), rows):
            u, d = torch.from_numpy(up[s : s + rows]).to(device), torch.from_numpy(down[s : s + rows]).to(device)
            extra = {"tags": torch.from_numpy(tagged[0][s : s + rows]).to(device)} if tagged else {}
            with autocast:
                _, loss = model(u, targets=d, **extra)
            n = int((d != PAD).sum())
            total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)
