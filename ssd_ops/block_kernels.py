"""The functions that :class:`ssd_ops.fused_block.FusedSSDBlock` computes with, forward and
backward: the causal convolution, the SSD scan and the gated RMSNorm, as Triton kernels
(:func:`triton_block_kernels`) or as their PyTorch references differentiated by autograd
(:func:`torch_block_kernels`, what the tests hold the Triton ones to).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.causal_conv_ref import causal_conv1d
from kernels.gated_norm_ref import gated_rmsnorm_ref
from ssd_ops.amp import cast
from ssd_ops.backend import triton_modules
from ssd_ops.scan import chunk_scan_torch


class BlockKernels(NamedTuple):
    """Forward and backward of the convolution, the SSD scan and the gated RMSNorm, as
    :class:`ssd_ops.fused_block.FusedSSDBlock` calls them: Triton (:func:`triton_block_kernels`)
    or the PyTorch references differentiated by autograd (:func:`torch_block_kernels`).

    ``scan_fwd(x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx) -> y`` (softplus on
    ``dt + dt_bias``);
    ``scan_bwd(dy, x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx, dx, ddt, dB, dC) -> (dA,
    dD, ddt_bias)``, writing the other gradients into the four given tensors;
    ``norm_fwd(y, z, weight, eps) -> (out, rstd)`` on [T E] rows (``rstd`` may be None);
    ``norm_bwd(dout, y, z, weight, eps, rstd, dz) -> (dy, dweight, out)``, writing dz, and giving
    the forward's output again;
    ``conv_fwd(x, weight, bias, activation, seq_idx) -> out``: the causal depthwise convolution
    and its activation on [B L C] rows, ``out`` contiguous;
    ``conv_bwd(x, weight, bias, dout, activation, dx, seq_idx) -> (dx, dweight, dbias)``, writing
    dx; ``seq_idx`` [B L] or None: the sequences laid end to end in each row
    (:class:`ssd_ops.packing.Packing`);
    ``conv(x, weight, bias, activation) -> out``: the two for autograd (the time branch's
    convolutions, outside the node).
    """

    scan_fwd: Callable
    scan_bwd: Callable
    norm_fwd: Callable
    norm_bwd: Callable
    conv_fwd: Callable
    conv_bwd: Callable
    conv: Callable


@functools.cache
def triton_block_kernels() -> BlockKernels:
    """mamba-ssm's own forward and backward functions of the scan (those its fused Mamba-2 block
    calls), and this project's Triton convolution and gated RMSNorm (:mod:`kernels.causal_conv`,
    :mod:`kernels.gated_norm`)."""
    ssd_combined, _ = triton_modules()
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd, causal_conv_act_fn
    from kernels.gated_norm import gated_rms_norm, gated_rms_norm_bwd

    def scan_fwd(x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx):
        return ssd_combined._mamba_chunk_scan_combined_fwd(
            x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
            dt_limit=dt_limit)[0]

    def scan_bwd(dy, x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx, dx, ddt, dB, dC):
        # mamba-ssm reads the forward's output (its `out`) only to gate it by z, and there is no
        # z here: x stands in for it, for the shape check
        grads = ssd_combined._mamba_chunk_scan_combined_bwd(
            dy, x, dt, A, B, C, x, chunk, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
            dt_limit=dt_limit, dx=dx, ddt=ddt, dB=dB, dC=dC)
        _, _, dA, _, _, dD, _, ddt_bias, _ = grads
        return dA, dD, ddt_bias

    def norm_bwd(dout, y, z, weight, eps, rstd, dz):
        return gated_rms_norm_bwd(dout, y, z, weight, rstd, dz)

    def conv_bwd(x, weight, bias, dout, activation, dx, seq_idx):
        # the node's own gradient buffer: the convolution's backward may write over it
        return causal_conv_act_bwd(x, weight, bias, dout, activation, dx, overwrite_dout=True,
                                   seq_idx=seq_idx)

    return BlockKernels(scan_fwd, scan_bwd, gated_rms_norm, norm_bwd, causal_conv_act, conv_bwd,
                        causal_conv_act_fn)


def torch_block_kernels() -> BlockKernels:
    """The same functions from :func:`causal_conv1d`, :func:`chunk_scan_torch` and
    :func:`gated_rmsnorm_ref` (backward by autograd, forward again): the reference that the tests
    hold the Triton ones to."""

    def scan(x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx):
        return chunk_scan_torch(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
                                dt_limit=dt_limit, seq_idx=seq_idx)

    def scan_bwd(dy, x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx, dx, ddt, dB, dC):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
            y = scan(*leaves[:5], chunk, leaves[5], leaves[6], dt_limit, seq_idx)
            grads = torch.autograd.grad(y, leaves, dy)
        for given, grad in zip((dx, ddt, dB, dC), (grads[0], grads[1], grads[3], grads[4])):
            given.copy_(grad)
        return grads[2], grads[5], grads[6]

    def norm_fwd(y, z, weight, eps):
        return gated_rmsnorm_ref(y, z, weight, eps), None

    def norm_bwd(dout, y, z, weight, eps, rstd, dz):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (y, z, weight)]
            out = gated_rmsnorm_ref(*leaves, eps)
            dy, dz_, dweight = torch.autograd.grad(out, leaves, dout)
        dz.copy_(dz_)
        return dy, dweight, out.detach()

    def conv(x, weight, bias, activation, seq_idx=None):  # [B L C] -> [B L C]
        # in the weights' dtype at least, out in x's: as the Triton kernel, for bfloat16 x too
        act = F.hardswish if activation == "hardswish" else F.silu
        dtype = torch.promote_types(x.dtype, weight.dtype)
        out = causal_conv1d(x.transpose(1, 2).to(dtype), *cast(dtype, weight, bias), seq_idx)
        return act(out).transpose(1, 2).to(x.dtype).contiguous()

    def conv_bwd(x, weight, bias, dout, activation, dx, seq_idx):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
            out = conv(*leaves, activation, seq_idx)
            dx_, dweight, dbias = torch.autograd.grad(out, leaves, dout)
        return dx.copy_(dx_), dweight, dbias

    return BlockKernels(scan, scan_bwd, norm_fwd, norm_bwd, conv, conv_bwd, conv)
