"""Speed kernels for the labeller: each computes exactly what a stock PyTorch expression computes, only faster
on the shapes this model meets. couplet/modelling/model.py decides when to use them; tests/test_kernels.py holds each
one to its stock equivalent.

- `fused_linear_cross_entropy`: the output layer and the loss in one autograd Function (CPU training).
- `conv1d_same_as_matmul`: a padding='same' Conv1d as one matmul (inference on a few positions).
- `conv1d_same_train`: the same matmul with a hand-written backward (CPU training), ~1.8x faster than oneDNN's
  convolution forward + backward on a training batch (64 x 128 x 5..7, one thread).
- `adaptive_log_probs`: an adaptive softmax layer's full log-probabilities (inference) from one matmul: the head and
  every tail cluster's two projections folded into one cached matrix, where torch's `log_prob` runs each cluster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from couplet.data.vocab import PAD

SMALL_INFERENCE_POSITIONS = 512  # up to this many positions (B*L), inference convolves by matmul


def conv1d_same_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.conv1d(x, weight, bias, padding="same")` as one matmul over unfolded windows, (B, d, L) -> (B, out, L).

    For the few positions of an interactive request, oneDNN's convolution costs ~150 µs of set-up
    per call; the matmul costs ~50 µs (measured with one thread; see docs/benchmarks.md).
    """
    b, d, length = x.shape
    out, k = weight.shape[0], weight.shape[2]  # weight (out, d, k)
    total = k - 1  # padding='same' puts total // 2 on the left, the rest on the right
    cols = F.pad(x, (total // 2, total - total // 2)).unfold(2, k, 1)  # (B, d, L, k)
    cols = cols.permute(0, 2, 1, 3).reshape(b * length, d * k)  # (B*L, d*k), channel-major like the weight
    h = torch.addmm(bias, cols, weight.reshape(out, d * k).t())  # (B*L, out)
    return h.reshape(b, length, out).transpose(1, 2)  # (B, out, L)


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

    Equals `F.cross_entropy(F.linear(x, weight, bias), targets, ignore_index=PAD)`, gradients included.
    matmul_dtype: dtype of the matmuls (default: x's); the softmax is always computed in fp32.
    """
    return _FusedLinearCrossEntropy.apply(x, weight, bias, targets, matmul_dtype or x.dtype)


class _Conv1dSameMatmul(torch.autograd.Function):
    """`F.conv1d(x, weight, bias, padding="same")` as one matmul over unfolded windows, with its own backward.

    oneDNN's convolution backward costs ~3x its forward on a training batch's shapes (64 x 128 x 7, one thread);
    here the backward is two matmuls (the weight's and the windows' gradients) and k shifted adds that fold the
    windows' gradient back onto x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (B, d, L), weight (out, d, k), bias (out,)
        b, d, length = x.shape
        out, k = weight.shape[0], weight.shape[2]
        total = k - 1
        cols = F.pad(x, (total // 2, total - total // 2)).unfold(2, k, 1)  # (B, d, L, k)
        cols = cols.permute(0, 2, 1, 3).reshape(b * length, d * k)  # (B*L, d*k)
        w2 = weight.reshape(out, d * k)
        h = torch.addmm(bias, cols, w2.t())  # (B*L, out)
        ctx.save_for_backward(cols, w2)
        ctx.shape = (b, d, length, k)
        return h.reshape(b, length, out).transpose(1, 2)  # (B, out, L)

    @staticmethod
    def backward(ctx, grad):  # grad (B, out, L)
        cols, w2 = ctx.saved_tensors
        b, d, length, k = ctx.shape
        g = grad.transpose(1, 2).reshape(b * length, -1)  # (B*L, out)
        grad_w = (g.t() @ cols).reshape(w2.shape[0], d, k)
        grad_b = g.sum(0)
        gc = (g @ w2).reshape(b, length, d, k)  # gc[:, l, :, j] is the gradient of x[:, :, l + j - left]
        left = (k - 1) // 2
        gx = gc.new_zeros(b, length, d)
        for j in range(k):
            s = j - left  # window column j reads x at l + s
            if s >= 0:
                gx[:, s:] += gc[:, : length - s, :, j]
            else:
                gx[:, : length + s] += gc[:, -s:, :, j]
        return gx.transpose(1, 2), grad_w, grad_b


def conv1d_same_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.conv1d(x, weight, bias, padding="same")`, (B, d, L) -> (B, out, L), gradients included; fp32 CPU training."""
    return _Conv1dSameMatmul.apply(x, weight, bias)


def _folded_adaptive(head: torch.nn.AdaptiveLogSoftmaxWithLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (S + C + V - S, d), bias) of the head's rows then each tail cluster's folded projection W2 @ W1;
    cached on the layer until any of its parameters changes (their version counters)."""
    params = list(head.parameters())
    key = tuple((p.data_ptr(), p._version) for p in params)
    cached = getattr(head, "_couplet_folded", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            tails = []
            for tail in head.tail:  # Sequential(Linear(d, h, bias=False), Linear(h, size, bias=False))
                inner, outer = tail[0].weight, tail[1].weight
                tails.append(outer @ inner)
            weight = torch.cat([head.head.weight, *tails])
            bias = head.head.bias if head.head.bias is not None else torch.zeros(head.head.out_features)
            bias = torch.cat([bias, bias.new_zeros(weight.shape[0] - bias.shape[0])])
        cached = (key, weight, bias)
        head._couplet_folded = cached  # a plain attribute: not in the state dict
    return cached[1], cached[2]


def adaptive_log_probs(x: torch.Tensor, head: torch.nn.AdaptiveLogSoftmaxWithLoss) -> torch.Tensor:
    """`head.log_prob(x)` for x (N, d) -> (N, V), without autograd: one matmul over the folded weights, then each
    cluster's log-softmax plus the head's log-probability of that cluster."""
    weight, bias = _folded_adaptive(head)
    logits = F.linear(x, weight.to(x.dtype), bias.to(x.dtype))
    shortlist, n_heads = head.shortlist_size, head.head.out_features
    head_lp = torch.log_softmax(logits[:, :n_heads], dim=1)
    parts, start = [head_lp[:, :shortlist]], n_heads
    for i, (low, high) in enumerate(zip(head.cutoffs, head.cutoffs[1:])):
        cluster = logits[:, start : start + high - low]
        parts.append(torch.log_softmax(cluster, dim=1) + head_lp[:, shortlist + i : shortlist + i + 1])
        start += high - low
    return torch.cat(parts, dim=1)
