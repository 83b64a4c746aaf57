"""The Mamba-1 block of mamba-ssm (``mamba_ssm.modules.mamba_simple.Mamba``), on this project's
selective scans.

    x, z = in_proj(u)                                                 [B L E] each, E = expand D
    x = SiLU(causal depthwise conv1d(x))
    dt, B, C = x_proj(x)                                              [B L R], [B L N], [B L N]
    y = selective_scan(x, dt_proj.weight dt, A, B, C, D, dt_proj.bias)   A = -exp(A_log)
    out = out_proj(y * SiLU(z))                                       [B L D]

with the step sizes ``softplus(dt_proj(dt))`` inside the scan (:mod:`kernels.selective_scan`).
The parameters have mamba-ssm's names, shapes and initialisation (bias=False, conv_bias=True,
``dt_rank = ceil(D / 16)``; dt_proj's weight uniform in +-dt_rank^-1/2 and its bias the inverse
softplus of a step log-uniform in [dt_min, dt_max]; ``A_log = log(1..N)`` in every channel, D = 1),
created in mamba-ssm's order, so that a seed draws the same weights and a checkpoint of mamba-ssm's
``Mamba`` or mambapy's ``MambaBlock`` loads unchanged.

Backends (``backend``), one function each way:
    ``triton``  :func:`kernels.selective_scan.selective_scan_fn` and the convolution of
                :mod:`kernels.causal_conv`; CUDA only (or Triton's interpreter).
    ``torch``   :func:`selective_scan_chunked` and PyTorch's conv1d (computed again in backward,
                as the Triton convolution does); any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from baseline.Mamba4Rec.scan import selective_scan_chunked
from kernels.causal_conv_ref import causal_conv_act_ref

BLOCK_BACKENDS = ("triton", "torch")


def _conv_silu_torch(x, weight, bias):
    """SiLU(causal depthwise conv) of x [B L E] by PyTorch's conv1d on [B E L]."""
    return causal_conv_act_ref(x, weight, bias, "silu")


def _conv_silu_recomputed(x, weight, bias):
    """:func:`_conv_silu_torch` keeping only its inputs for backward (x is a view of in_proj's
    output, which backward keeps anyway), not the padded copy and the pre-activation."""
    return checkpoint(_conv_silu_torch, x, weight, bias, use_reentrant=False)


def _kernels(backend: str):
    """``(conv_silu, selective_scan)`` of a backend; Triton's are imported here, on first use."""
    if backend == "torch":
        return _conv_silu_recomputed, selective_scan_chunked
    from kernels.causal_conv import causal_conv_act_fn
    from kernels.selective_scan import selective_scan_fn

    def conv_silu(x, weight, bias):
        return causal_conv_act_fn(x, weight, bias, "silu")

    return conv_silu, selective_scan_fn


class MambaBlock(nn.Module):
    r"""A Mamba-1 mixer [B L D] -> [B L D] (module docstring)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 backend: str = "torch"):
        super().__init__()
        if backend not in BLOCK_BACKENDS:
            raise ValueError(f"backend must be one of {BLOCK_BACKENDS}, got {backend!r}")
        self.backend = backend
        self.d_inner, self.d_state = expand * d_model, d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        # Padding only for mamba-ssm's module (same parameters); forward pads on the left itself.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        self._init_dt_proj(dt_min, dt_max, dt_init_floor)
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))  # [E N]
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def _init_dt_proj(self, dt_min: float, dt_max: float, floor: float) -> None:
        """mamba-ssm's: the weight uniform in +-dt_rank^-1/2, the bias such that its softplus, the
        step size, is log-uniform in [dt_min, dt_max] (at least ``floor``)."""
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        conv_silu, selective_scan = _kernels(self.backend)
        x, z = self.in_proj(u).chunk(2, dim=-1)  # [B L E] each
        x = conv_silu(x, self.conv1d.weight, self.conv1d.bias)  # [B L E]
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # [B L E]; the bias goes into the scan's softplus
        y = selective_scan(x, dt, -torch.exp(self.A_log), B, C, self.D, self.dt_proj.bias)
        return self.out_proj(y * F.silu(z))  # [B L D]
