"""The Triton causal convolution against its PyTorch reference: one function for the CPU (float64,
Triton's interpreter, run in a process of its own by tests/test_causal_conv.py) and the GPU.

    TRITON_INTERPRET=1 python tests/causal_conv_checks.py     # prints the errors as JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (batch, length, channels, kernel width, activation, row stride): odd sizes that leave partial
# blocks of steps and channels, sequences shorter than the kernel, rows read from a wider tensor.
SHAPES = [(3, 37, 70, 4, "hardswish", 90), (2, 5, 8, 2, "silu", 9), (2, 70, 130, 4, "silu", 140),
          (1, 3, 5, 4, "hardswish", 9), (4, 200, 192, 4, "hardswish", 324)]


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def kernel_errors(device: str, dtype: torch.dtype) -> dict:
    """Output and the three gradients of each shape, relative to the reference."""
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd, causal_conv_act_ref

    errors = {}
    for batch, length, channels, width, activation, stride in SHAPES:
        g = torch.Generator().manual_seed(length)

        def rand(*shape, scale=1.0, g=g):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

        wide = rand(batch, length, stride, scale=3.0)  # spans both hardswish corners
        x = wide[..., 1:channels + 1]  # rows of stride `stride`, as in in_proj's output
        weight, bias, dout = rand(channels, 1, width), rand(channels), rand(batch, length, channels)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        ref = causal_conv_act_ref(*leaves, activation)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        dx_into = torch.zeros(batch, length, stride, device=device, dtype=dtype)
        dx, dweight, dbias = causal_conv_act_bwd(x, weight, bias, dout, activation,
                                                 dx=dx_into[..., 1:channels + 1])
        name = f"{batch}x{length}x{channels} K{width} {activation}"
        errors[f"{name} out"] = rel(causal_conv_act(x, weight, bias, activation), ref)
        errors[f"{name} dx"] = rel(dx, ref_grads[0])
        errors[f"{name} dweight"] = rel(dweight, ref_grads[1])
        errors[f"{name} dbias"] = rel(dbias, ref_grads[2])
        # dx went into the given slice, and nowhere else
        errors[f"{name} dx outside"] = (dx_into[..., 0].abs().sum()
                                        + dx_into[..., channels + 1:].abs().sum()).item()
    return errors


def fused_block_errors(device: str, dtype: torch.dtype) -> dict:
    """FusedSSDBlock with the PyTorch scan and norm and the Triton convolution, against the module
    path: output and every gradient."""
    import ssd
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd
    from tests.test_ssd import block_outputs_and_grads

    kernels = ssd.torch_block_kernels()._replace(conv_fwd=causal_conv_act,
                                                 conv_bwd=causal_conv_act_bwd)
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=4,
                             backend="torch").to(device, dtype).eval()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.1)
    u = torch.randn(3, 12, 16, device=device, dtype=dtype, requires_grad=True)
    tau = torch.randn(3, block.nheads, 12, device=device, dtype=dtype, requires_grad=True)
    results = [block_outputs_and_grads(block, u, tau, run) for run in (
        block, lambda u, tau: block.forward_fused(u, tau, kernels))]
    (plain_out, plain), (fused_out, fused) = results
    assert plain.keys() == fused.keys()
    return {"block out": rel(fused_out, plain_out),
            **{f"block grad {name}": rel(fused[name], plain[name]) for name in plain}}


if __name__ == "__main__":
    print(json.dumps({**kernel_errors("cpu", torch.float64),
                      **fused_block_errors("cpu", torch.float64)}))
