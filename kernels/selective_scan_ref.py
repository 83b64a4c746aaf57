"""Mamba-1's selective scan in PyTorch, one step after the other: the reference of
:mod:`kernels.selective_scan`'s Triton kernels and of Mamba4Rec's chunked CPU scan
(``baseline/Mamba4Rec/scan.py``). The recurrence is written out in :mod:`kernels.selective_scan`.

No Triton here: the CPU tests import this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(x, dt, A, B, C, D, dt_bias):
    """The reference: the recurrence one step after the other, differentiated by autograd."""
    delta = F.softplus(dt + dt_bias)  # [B L E]
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])  # [B E N]
    ys = []
    for t in range(x.shape[1]):
        h = (torch.exp(delta[:, t, :, None] * A) * h
             + (delta[:, t] * x[:, t])[:, :, None] * B[:, t, None, :])
        ys.append((h * C[:, t, None, :]).sum(-1))  # [B E]
    return torch.stack(ys, dim=1) + D * x
