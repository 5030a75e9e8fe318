"""The speed kernels of couplet/modelling/kernels.py, each held to the stock PyTorch expression it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from couplet.modelling.kernels import adaptive_log_probs, conv1d_same_as_matmul, conv1d_same_train, fused_linear_cross_entropy
from couplet.modelling.model import GatedConvBlock
from couplet.data.vocab import PAD


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kernel_size", [1, 3, 4, 5])
def test_inference_matmul_path_equals_the_convolution(kernel_size):
    torch.manual_seed(kernel_size)
    block = GatedConvBlock(dim=8, kernel_size=kernel_size)
    x = torch.randn(3, 8, 7)
    with torch.no_grad():
        torch.testing.assert_close(conv1d_same_as_matmul(x, block.conv.weight, block.conv.bias), block.conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3, 4, 5])
@pytest.mark.parametrize("length", [1, 2, 7])
def test_training_matmul_path_equals_the_convolution_with_gradients(kernel_size, length):
    torch.manual_seed(kernel_size * 10 + length)
    x = torch.randn(3, 8, length, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 8, kernel_size, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 16, length, dtype=torch.float64)
    got = conv1d_same_train(x, w, b)
    want = F.conv1d(x, w, b, padding="same")
    torch.testing.assert_close(got, want)
    for mine, stock in zip(torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)):
        torch.testing.assert_close(mine, stock)


def test_a_training_block_uses_the_matmul_path_and_matches_the_stock_one():
    torch.manual_seed(0)
    block = GatedConvBlock(dim=8, kernel_size=3)
    x = torch.randn(4, 8, 6, requires_grad=True)
    out = block(x)  # grad enabled, CPU, fp32: conv1d_same_train
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    assert "_Conv1dSameMatmulBackward" in {type(fn).__name__ for fn in seen}
    h = F.conv1d(x, block.conv.weight, block.conv.bias, padding="same")
    want = torch.lerp(h[:, 8:], x, torch.sigmoid(h[:, :8]))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


def test_fused_loss_matches_autograd_cross_entropy():
    torch.manual_seed(0)
    x = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (23,))
    t[:4] = PAD
    fused = fused_linear_cross_entropy(x, w, b, t)
    grads = torch.autograd.grad(2.5 * fused, (x, w, b))
    plain = F.cross_entropy(F.linear(x, w, b), t, ignore_index=PAD)
    expected = torch.autograd.grad(2.5 * plain, (x, w, b))
    torch.testing.assert_close(fused, plain)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_fused_loss_bf16_matmuls_stay_close_to_fp32():
    torch.manual_seed(0)
    x, w, b = torch.randn(40, 16), torch.randn(60, 16) * 0.3, torch.randn(60) * 0.1
    t = torch.randint(1, 60, (40,))
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    loss16 = fused_linear_cross_entropy(*leaves, t, matmul_dtype=torch.bfloat16)
    loss16.backward()
    loss32 = F.cross_entropy(F.linear(x, w, b), t)
    assert loss16.dtype == torch.float32 and abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    assert all(v.grad.dtype == torch.float32 for v in leaves)


@pytest.mark.parametrize("div", [1.0, 2.0])
def test_folded_adaptive_log_probs_equal_torchs_and_follow_weight_updates(div):
    torch.manual_seed(0)
    head = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 50, [6, 20], div_value=div, head_bias=True)
    x = torch.randn(9, 16)
    with torch.no_grad():
        torch.testing.assert_close(adaptive_log_probs(x, head), head.log_prob(x), rtol=1e-5, atol=1e-5)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)  # a step changes every weight in place
    head(x, torch.randint(0, 50, (9,))).loss.backward()
    optimizer.step()
    with torch.inference_mode():
        folded = adaptive_log_probs(x, head)
        torch.testing.assert_close(folded, head.log_prob(x), rtol=1e-5, atol=1e-5)  # not the cached matrix
        torch.testing.assert_close(folded.exp().sum(dim=1), torch.ones(9), rtol=1e-5, atol=1e-5)
