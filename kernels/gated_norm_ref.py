"""The SSD block's gated RMSNorm in PyTorch: the path on the CPU, and the reference of
:mod:`kernels.gated_norm`'s Triton kernels and of mamba-ssm's ``rmsnorm_fn``.

No Triton here: the CPU path imports this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import compute_dtype


def gated_rmsnorm_ref(x, z, weight, eps, norm_before_gate=False):
    """``RMSNorm(x * silu(z)) * weight`` over the last axis (one group), computed in >= float32."""
    out_dtype, cdt = x.dtype, compute_dtype(x.dtype)
    x, weight = x.to(cdt), weight.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        x = x * gate
    out = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(out_dtype)
