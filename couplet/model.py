"""The couplet labeller: a character gated-CNN that labels each upper-line position with its lower-line character.

Su Jianlin (2019), "基于CNN和序列标注的对联机器人": both lines of a couplet have the same length, so generating
the lower line is sequence labelling. Embedding (128) -> dropout 0.25 -> 6 residual gated conv blocks -> a
per-position softmax over the vocabulary. Everything lives in this one file, nanoGPT style.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from couplet.config import Config, ModelConfig, config_from_dict
from couplet.vocab import PAD, Vocab


SMALL_INFERENCE_POSITIONS = 512  # up to this many positions (B*L), inference convolves by matmul


class GatedConvBlock(nn.Module):
    """Residual gated convolution: h = conv(x) split into g, c; out = x*sigmoid(g) + c*sigmoid(-g).

    Works channels-first, (B, d, L), the layout Conv1d wants, so a stack of blocks needs no transposes.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv1d(dim, 2 * dim, kernel_size, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.shape[0] * x.shape[2] <= SMALL_INFERENCE_POSITIONS and not torch.is_grad_enabled()
        h = self._conv_as_matmul(x) if small else self.conv(x)  # (B, 2d, L)
        g, c = h[:, : self.dim], h[:, self.dim :]  # (B, d, L) each: gate first, candidate second
        # x*s(g) + c*s(-g) == c + (x - c)*s(g) because s(-g) = 1 - s(g): one sigmoid instead of two
        return torch.lerp(c, x.to(c.dtype), torch.sigmoid(g))  # (B, d, L); the cast matters under autocast


    def _conv_as_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The same convolution as one matmul over unfolded windows, (B, d, L) -> (B, 2d, L).

        For the few positions of an interactive request, oneDNN's convolution costs ~150 µs of set-up
        per call; the matmul costs ~50 µs (measured with one thread; see docs/benchmarks.md).
        """
        b, d, length = x.shape
        k = self.conv.kernel_size[0]
        total = k - 1  # padding='same' puts total // 2 on the left, the rest on the right
        cols = F.pad(x, (total // 2, total - total // 2)).unfold(2, k, 1)  # (B, d, L, k)
        cols = cols.permute(0, 2, 1, 3).reshape(b * length, d * k)  # (B*L, d*k), channel-major like the weight
        h = torch.addmm(self.conv.bias, cols, self.conv.weight.reshape(2 * d, d * k).t())  # (B*L, 2d)
        return h.reshape(b, length, 2 * d).transpose(1, 2)  # (B, 2d, L)


class CoupletLabeller(nn.Module):
    """Upper-line ids (B, L) -> lower-line logits (B, L, V)."""

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.vocab_size = vocab_size
        self.cfg = cfg
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GatedConvBlock(cfg.embed_dim, cfg.kernel_size) for _ in range(cfg.n_blocks))
        self.head = nn.Linear(cfg.embed_dim, vocab_size)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The last block's output, (B, L, d), zero at PAD positions."""
        mask = (ids != PAD).unsqueeze(1)  # (B, 1, L)
        has_pad = not bool(mask.all())  # equal-length training batches skip the masking multiplies
        x = self.dropout(self.embedding(ids)).transpose(1, 2)  # (B, d, L)
        for block in self.blocks:
            if has_pad:
                x = x * mask  # PAD positions are zero before every conv, so they never leak into neighbours
            x = block(x)  # (B, d, L)
        if has_pad:
            x = x * mask
        return x.transpose(1, 2)  # (B, L, d)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None):
        """ids (B, L) int64 -> (logits (B, L, V), None), or with targets (B, L) -> (None, mean loss over non-PAD).

        With targets the logits are not materialised for the caller: on CPU the loss is fused with the
        output layer (see _FusedLinearCrossEntropy). Call without targets, or use log_probs, for logits.
        """
        x = self.features(ids)  # (B, L, d)
        if targets is None:
            return self.head(x), None  # (B, L, V)
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, d), (N,)
        if x.is_cuda:  # GPU memory is plentiful and autocast handles dtypes: the stock loss is fine there
            loss = F.cross_entropy(self.head(x).float(), targets, ignore_index=PAD)
        else:
            amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            loss = fused_linear_cross_entropy(x, self.head.weight, self.head.bias, targets, matmul_dtype=amp)
        return None, loss

    @torch.no_grad()
    def log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        """Log-softmax over the vocabulary, (B, L, V), in eval mode; PAD/UNK are not masked here."""
        was_training = self.training
        self.eval()
        try:
            logits, _ = self(ids)
            return F.log_softmax(logits.float(), dim=-1)
        finally:
            self.train(was_training)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ W.T + b) against targets, ignoring PAD, with one (N, V) buffer.

    The output layer dominates training cost. Autograd's linear + cross_entropy keeps the logits and an
    fp32 log-softmax copy, then builds two more (N, V) gradients. Here one fp32 logits buffer is turned
    into exp(logits - max) in place in forward, and into its own gradient (softmax - one-hot) in place in
    backward, which then feeds both matmuls. `matmul_dtype` (e.g. bf16 under CPU autocast) is the dtype
    of the three matmuls only; the softmax arithmetic stays fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, matmul_dtype):  # x (N, d), weight (V, d), bias (V,), targets (N,)
        with torch.autocast(x.device.type, enabled=False):
            xm, wm = x.to(matmul_dtype), weight.to(matmul_dtype)  # no copies in fp32
            buf = torch.addmm(bias.to(matmul_dtype), xm, wm.t())  # (N, V) logits
            buf = buf.to(torch.promote_types(buf.dtype, torch.float32))  # softmax in fp32 (or fp64)
            picked = buf.gather(1, targets.unsqueeze(1))  # (N, 1) logit of the target
            row_max = buf.amax(dim=1, keepdim=True)  # (N, 1)
            buf.sub_(row_max).exp_()  # (N, V) exp(logits - max), in place
            row_sum = buf.sum(dim=1, keepdim=True)  # (N, 1)
            nll = (row_max + row_sum.log() - picked).squeeze(1)  # (N,) logsumexp - target logit
            weight_per_row = (targets != PAD).to(buf.dtype)  # (N,) PAD rows count for nothing
            n_valid = weight_per_row.sum().clamp(min=1.0)
        ctx.save_for_backward(xm, wm, targets)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.buffers = (buf, row_sum, weight_per_row / n_valid)  # buf is overwritten in backward
        return (nll * weight_per_row).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        xm, wm, targets = ctx.saved_tensors
        if ctx.buffers is None:
            raise RuntimeError("fused_linear_cross_entropy: one backward per forward (its buffer is reused in place)")
        g, row_sum, row_weight = ctx.buffers
        ctx.buffers = None
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        w = (row_weight * grad_out.to(g.dtype)).unsqueeze(1)  # (N, 1)
        g.mul_(w / row_sum)  # (N, V) softmax, scaled
        g.scatter_add_(1, targets.unsqueeze(1), -w)  # minus the one-hot
        grad_b = g.sum(0).to(b_dtype)  # (V,)
        g = g.to(wm.dtype)  # no copy in fp32
        grad_x = (g @ wm).to(x_dtype)  # (N, d)
        grad_w = (g.t() @ xm).to(w_dtype)  # (V, d)
        return grad_x, grad_w, grad_b, None, None


def fused_linear_cross_entropy(x, weight, bias, targets, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cross-entropy of the linear layer (weight, bias) on x (N, d) against targets (N,), mean over non-PAD.

    matmul_dtype: dtype of the matmuls (default: x's); the softmax is always computed in fp32.
    """
    return _FusedLinearCrossEntropy.apply(x, weight, bias, targets, matmul_dtype or x.dtype)


def save_labeller(model: CoupletLabeller, vocab: Vocab, config: Config, model_dir: str | Path) -> None:
    """Write model.safetensors (state_dict), vocab.json and config.json (+ vocab_size), each atomically."""
    from safetensors.torch import save_file

    from couplet.atomic import atomic_write_json

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = model_dir / f".model.safetensors.tmp-{uuid.uuid4().hex[:8]}"
    save_file(state, str(tmp))
    tmp.replace(model_dir / "model.safetensors")
    vocab.save(model_dir / "vocab.json")
    atomic_write_json(model_dir / "config.json", {**config.to_dict(), "vocab_size": len(vocab)})


def load_labeller(model_dir: str | Path, device: str = "cpu") -> tuple[CoupletLabeller, Vocab, Config]:
    """Read a model dir written by save_labeller; returns the model in eval mode on `device`."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    vocab_size = int(raw.pop("vocab_size"))
    sections = {f.name for f in dataclasses.fields(Config)}
    config = config_from_dict({k: v for k, v in raw.items() if k in sections})  # extras such as vocab_size ignored
    vocab = Vocab.load(model_dir / "vocab.json")
    if len(vocab) != vocab_size:
        raise ValueError(f"{model_dir}: vocab.json has {len(vocab)} entries, config.json says {vocab_size}")
    # built on CPU (random init costs ~10 ms; a meta-device build imports torch._refs, ~2 s), then the file's
    # tensors are assigned in place of the random ones
    model = CoupletLabeller(vocab_size, config.model)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), assign=True)
    return model.to(device).eval(), vocab, config
