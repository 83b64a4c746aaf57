"""This project's Triton kernels (kernels/) against their PyTorch references, on a CPU and a GPU."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ssd_ops.backend import triton_unavailable_reason
from tests.conftest import interpreted_errors
from tests.kernel_checks import all_errors

CHECKS = Path(__file__).with_name("kernel_checks.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_kernels_match_reference_in_float64_on_the_cpu():
    """Forward and gradients of each kernel, and the fused SSD block with the convolution, through
    Triton's interpreter (which must be chosen before triton is imported: a process of its own)."""
    errors = interpreted_errors(CHECKS)
    assert len(errors) > 80
    assert all(err < 1e-12 for err in errors.values()), errors


@pytest.mark.skipif(not torch.cuda.is_available() or triton_unavailable_reason() is not None,
                    reason="needs CUDA and Triton")
def test_kernels_match_reference_on_gpu():
    errors = all_errors("cuda", torch.float32)
    print(errors)
    assert all(err < 1e-5 for err in errors.values()), errors


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_tensors_beyond_32_bit_offsets_are_refused():
    """The convolution addresses with 32-bit offsets: a larger tensor is a clear error, not a wrong
    read."""
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd

    rows = torch.empty((70000, 200, 324), device="meta")  # in_proj's output at 64d, L 200
    x, weight, bias = rows[..., :192], torch.empty(192, 1, 4), torch.empty(192)
    with pytest.raises(ValueError, match="32-bit offsets"):
        causal_conv_act(x, weight, bias)
    x = x[:6000]  # fits; its gradient's rows in a much wider tensor do not
    dx = torch.empty((6000, 200, 2000), device="meta")[..., :192]
    with pytest.raises(ValueError, match="32-bit offsets"):
        causal_conv_act_bwd(x, weight, bias, torch.empty(x.shape, device="meta"), dx=dx)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_dropout_kernels_refuse_what_they_cannot_compute():
    """Beyond 32-bit offsets, rows wider than the blocks, a residual of another shape, p outside
    [0, 1], a strided input: a clear error before any launch."""
    from kernels.act_dropout import act_dropout
    from kernels import MAX_WIDTH
    from kernels.add_norm import dropout_add_norm

    weight = torch.empty(64, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        dropout_add_norm(torch.empty((200_000, 200, 64), device="meta"), None, weight, weight,
                         1e-5, 0.2)
    wide = torch.empty(MAX_WIDTH + 1, device="meta")
    with pytest.raises(ValueError, match="last axis"):
        dropout_add_norm(torch.empty((2, MAX_WIDTH + 1), device="meta"), None, wide, wide, 1e-5, 0)
    x = torch.empty((2, 3, 64), device="meta")
    with pytest.raises(ValueError, match="shaped like x"):
        dropout_add_norm(x, x[:1], weight, weight, 1e-5, 0.2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        dropout_add_norm(x, x, weight, weight, 1e-5, 1.5)
    with pytest.raises(ValueError, match="32-bit offsets"):
        act_dropout(torch.empty((50_000, 200, 256), device="meta"), 0.2, None)
    with pytest.raises(ValueError, match="contiguous"):
        act_dropout(torch.empty((4, 256), device="meta").t(), 0.2, None)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_embedding_grad_refuses_what_it_cannot_compute():
    """Indices that do not match the gradient's positions, rows wider than a block, a table beyond
    32-bit offsets: a clear error before any launch; deterministic algorithms: PyTorch's sums."""
    from kernels import MAX_WIDTH
    from kernels.embedding_grad import embedding_grad

    grad = torch.empty((4, 50, 64), device="meta")
    with pytest.raises(ValueError, match="do not match"):
        embedding_grad(torch.empty((4, 49), device="meta", dtype=torch.long), grad, 10, 0)
    with pytest.raises(ValueError, match="last axis"):
        embedding_grad(torch.empty(3, device="meta", dtype=torch.long),
                       torch.empty((3, MAX_WIDTH + 1), device="meta"), 10, 0)
    with pytest.raises(ValueError, match="32-bit offsets"):
        embedding_grad(torch.empty((4, 50), device="meta", dtype=torch.long), grad, 40_000_000, 0)
    indices = torch.tensor([[1, 0, 2, 1]])
    grad = torch.randn(1, 4, 3, dtype=torch.float64)
    torch.use_deterministic_algorithms(True)
    try:  # no launch: on the CPU without the interpreter, a launch would fail
        out = embedding_grad(indices, grad, 3, 0)
    finally:
        torch.use_deterministic_algorithms(False)
    expected = torch.stack([torch.zeros(3, dtype=torch.float64), grad[0, 0] + grad[0, 3],
                            grad[0, 2]])
    assert torch.equal(out, expected)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_gated_norm_refuses_what_it_cannot_compute():
    """y and z of other shapes, rows wider than a block, strided columns, a dz it cannot write:
    a clear error before any launch."""
    from kernels import MAX_WIDTH
    from kernels.gated_norm import gated_rms_norm, gated_rms_norm_bwd

    y, weight = torch.empty((6, 128), device="meta"), torch.empty(128, device="meta")
    with pytest.raises(ValueError, match="rows and weight"):
        gated_rms_norm(y, y[:5], weight, 1e-5)
    wide = torch.empty((2, MAX_WIDTH + 1), device="meta")
    with pytest.raises(ValueError, match="last axis"):
        gated_rms_norm(wide, wide, torch.empty(MAX_WIDTH + 1, device="meta"), 1e-5)
    strided = torch.empty((128, 6), device="meta").t()
    with pytest.raises(ValueError, match="rows of y and z must be contiguous"):
        gated_rms_norm(y, strided, weight, 1e-5)
    rstd = torch.empty(6, device="meta")
    with pytest.raises(ValueError, match="dz must be"):
        gated_rms_norm_bwd(y, y, y, weight, rstd, strided)
