"""The Triton selective scan (kernels/selective_scan.py), and the Mamba-1 block on it, against the
PyTorch references: functions for the CPU (float64, Triton's interpreter, run in a process of
their own by tests/test_selective_scan.py) and the GPU (float32 against the float64 reference),
each returning relative errors by name (and asserting what has no tolerance).

    TRITON_INTERPRET=1 python tests/selective_scan_checks.py     # prints the errors as JSON
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.numerics import rel_err  # noqa: E402  (after the path: this file runs as a script too)

# (batch, length, channels, states, chunk): a length that is not a multiple of the chunk, one step,
# odd channel counts, several blocks of channels (the last partial), N = 16 and 32, chunks of
# 2 and 4 (many of them), a chunk longer than the sequence.
SHAPES = [(2, 13, 5, 16, 8), (1, 1, 3, 32, 8), (1, 19, 7, 32, 4), (1, 5, 40, 16, 8),
          (2, 6, 3, 16, 2), (1, 3, 6, 8, 8)]
# On a GPU, the settings of the paper's configs too (64d: 128 channels; 256d: 512 channels).
GPU_SHAPES = [(8, 50, 128, 32, 8), (4, 200, 128, 32, 8), (2, 200, 512, 32, 8), (3, 37, 70, 16, 8)]


def scan_inputs(batch, length, channels, states, seed=0):
    """``(x, dt, A, B, C, D, dt_bias)`` and a gradient for y, in float64 on the CPU. B and C are
    column slices of one wider tensor (rows of another stride), as x_proj's output gives them;
    A spans Mamba's init (-1 .. -N) and beyond; dt of the first channel lies above the softplus's
    threshold (20), the others mostly below."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x, dt = rand(batch, length, channels), rand(batch, length, channels, scale=4.0)
    dt[..., 0] += 25.0
    A = -torch.arange(1, states + 1, dtype=torch.float64) * torch.exp(rand(channels, states))
    wide = rand(batch, length, 2 * states + 3)
    B, C = wide[..., 1:states + 1], wide[..., states + 1:2 * states + 1]
    return (x, dt, A, B, C, rand(channels), rand(channels)), rand(batch, length, channels)


def scan_errors(device: str, dtype: torch.dtype, shapes=SHAPES) -> dict:
    """y and the seven gradients of the kernels (called directly, and through autograd), in
    ``dtype`` on ``device``, against the reference in float64."""
    from kernels.selective_scan import selective_scan_bwd, selective_scan_fn, selective_scan_fwd
    from kernels.selective_scan_ref import selective_scan_ref

    errors = {}
    for batch, length, channels, states, chunk in shapes:
        inputs, dy = scan_inputs(batch, length, channels, states)
        leaves = [t.to(device).requires_grad_() for t in inputs]
        ref = selective_scan_ref(*leaves)
        ref_grads = torch.autograd.grad(ref, leaves, dy.to(device))
        args = [t.to(device, dtype) for t in inputs]
        y, kept = selective_scan_fwd(*args, chunk=chunk)
        assert kept.shape == (batch, -(-length // chunk) - 1, states, channels), kept.shape
        grads = selective_scan_bwd(*args, kept, dy.to(device, dtype), chunk=chunk)
        name = f"scan {batch}x{length}x{channels} N{states} chunk {chunk}"
        errors[f"{name} y"] = rel_err(y.double(), ref)
        for label, grad, ref_grad in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"), grads,
                                         ref_grads, strict=True):
            assert grad.dtype == dtype and grad.shape == ref_grad.shape, label
            errors[f"{name} {label}"] = rel_err(grad.double(), ref_grad)
        if chunk == 8:  # the default chunk: selective_scan_fn's
            leaves = [t.requires_grad_() for t in args]
            y = selective_scan_fn(*leaves)
            grads = torch.autograd.grad(y, leaves, dy.to(device, dtype))
            errors[f"{name} y, autograd"] = rel_err(y.double(), ref)
            for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=True)):
                errors[f"{name} grad {i}, autograd"] = rel_err(grad.double(), ref_grad)
    return errors


def block_errors(device: str, dtype: torch.dtype) -> dict:
    """The Mamba-1 block on the Triton backend (its convolution and scan) against the same block
    on the PyTorch backend in float64: output, the input's and every parameter's gradient."""
    from baseline.Mamba4Rec.mamba_block import MambaBlock

    torch.manual_seed(0)
    block = MambaBlock(16, d_state=8, d_conv=4, expand=2, backend="torch").double()
    for p in block.parameters():  # away from the init: every weight matters
        p.data.add_(torch.randn_like(p), alpha=0.1)
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    dout = torch.randn(2, 11, 16, dtype=torch.float64)

    def run(module, inp):
        leaves = [inp, *module.parameters()]
        out = module(inp)
        return out, torch.autograd.grad(out, leaves, dout.to(inp))

    ref_out, ref_grads = run(block.to(device), u.to(device).requires_grad_())
    fast = copy.deepcopy(block).to(dtype)
    fast.backend = "triton"
    out, grads = run(fast, u.to(device, dtype).requires_grad_())
    names = ["u", *(name for name, _ in block.named_parameters())]
    errors = {"block out": rel_err(out.double(), ref_out)}
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        errors[f"block grad {name}"] = rel_err(grad.double(), ref_grad)
    return errors


def all_errors(device: str, dtype: torch.dtype) -> dict:
    shapes = SHAPES + (GPU_SHAPES if device != "cpu" else [])
    return {**scan_errors(device, dtype, shapes), **block_errors(device, dtype)}


if __name__ == "__main__":
    print(json.dumps(all_errors("cpu", torch.float64)))
