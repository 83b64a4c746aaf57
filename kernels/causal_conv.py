"""Depthwise causal convolution over the sequence, then an activation, on [B L C] tensors (Triton).

TiM4Rec's in_proj writes x, B and C as [B L C] rows, and mamba-ssm's scan reads them so. PyTorch's
depthwise ``conv1d`` wants [B C L]: with it, every pass (forward, the recomputation in backward, the
backward itself) adds transposed copies of the whole tensor, and its depthwise kernels are slow at
this size (8 ms of a 60 ms step at L 200, batch 2048, on an H100). These two kernels read and write
the [B L C] layout directly, with any row stride (in_proj's output is read in place):

- :func:`causal_conv_act`: ``act(b_c + sum_k w_ck x_{t-K+1+k, c})``, zero before the first step;
- :func:`causal_conv_act_bwd`: from the output's gradient, the gradients of x (written where the
  caller says, e.g. into a slice of in_proj's output gradient), of the weight and of the bias. The
  pre-activation is computed again from x (K more reads, from cache), so forward keeps nothing.

The reference is :func:`causal_conv_act_ref` (PyTorch, differentiated by autograd); the tests hold
both kernels to it in float64 (Triton's interpreter, on the CPU) and in float32 on a GPU. Weight and
bias gradients are summed per block of steps, then over blocks by PyTorch: no atomics, the same
result on every run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ACTIVATIONS = ("hardswish", "silu")
BLOCK_L, BLOCK_C, NUM_WARPS = 32, 64, 4


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:  # hardswish, as PyTorch computes it
        return x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    else:  # silu
        return x / (1.0 + tl.exp(-x))


@triton.jit
def _activation_grad(x, ACT: tl.constexpr):
    if ACT == 0:  # PyTorch's hardswish_backward, boundaries included
        return tl.where(x < -3.0, 0.0, tl.where(x <= 3.0, x / 3.0 + 0.5, 1.0))
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
        return s * (1.0 + x * (1.0 - s))


@triton.jit
def _pre_activation(x_row0, W, bias, t, c, cmask, L, stride_xl, K: tl.constexpr,
                    DTYPE: tl.constexpr):
    """b_c + sum_k w_ck x_{t-K+1+k, c} for the steps t [BL] and channels c [BC] of one sequence."""
    acc = tl.zeros((t.shape[0], c.shape[0]), DTYPE) + bias[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        inside = (src >= 0) & (src < L)
        x = tl.load(x_row0 + src[:, None] * stride_xl + c[None, :],
                    mask=inside[:, None] & cmask[None, :], other=0.0).to(DTYPE)
        w = tl.load(W + c * K + k, mask=cmask, other=0.0).to(DTYPE)
        acc += x * w[None, :]
    return acc


@triton.jit
def _causal_conv_fwd_kernel(X, W, BIAS, OUT, L, C, n_lblocks, stride_xb, stride_xl, stride_ob,
                            stride_ol, K: tl.constexpr, ACT: tl.constexpr, DTYPE: tl.constexpr,
                            BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    b, pid_l = pid // n_lblocks, pid % n_lblocks
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    bias = tl.load(BIAS + c, mask=cmask, other=0.0).to(DTYPE)
    pre = _pre_activation(X + b * stride_xb, W, bias, t, c, cmask, L, stride_xl, K, DTYPE)
    out = _activation(pre, ACT)
    tl.store(OUT + b * stride_ob + t[:, None] * stride_ol + c[None, :],
             out.to(OUT.dtype.element_ty), mask=(t < L)[:, None] & cmask[None, :])


@triton.jit
def _causal_conv_bwd_kernel(X, W, BIAS, DOUT, DX, DW, DB, L, C, n_lblocks, stride_xb, stride_xl,
                            stride_gb, stride_gl, stride_dxb, stride_dxl,
                            K: tl.constexpr, ACT: tl.constexpr, DTYPE: tl.constexpr,
                            BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    b, pid_l = pid // n_lblocks, pid % n_lblocks
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    bias = tl.load(BIAS + c, mask=cmask, other=0.0).to(DTYPE)
    x_row0 = X + b * stride_xb
    dx = tl.zeros((BLOCK_L, BLOCK_C), DTYPE)
    for m in tl.static_range(K):
        # The pre-activation's gradient at the steps s = t + m, which t feeds through w_{K-1-m}.
        s = t + m
        pre = _pre_activation(x_row0, W, bias, s, c, cmask, L, stride_xl, K, DTYPE)
        g = tl.load(DOUT + b * stride_gb + s[:, None] * stride_gl + c[None, :],
                    mask=(s < L)[:, None] & cmask[None, :], other=0.0).to(DTYPE)
        dpre = g * _activation_grad(pre, ACT)
        w = tl.load(W + c * K + (K - 1 - m), mask=cmask, other=0.0).to(DTYPE)
        dx += dpre * w[None, :]
        if m == 0:  # this block's share of the weight and bias gradients
            tl.store(DB + pid * C + c, tl.sum(dpre, axis=0), mask=cmask)
            for k in tl.static_range(K):
                src = t - (K - 1) + k
                inside = (src >= 0) & (src < L)
                x = tl.load(x_row0 + src[:, None] * stride_xl + c[None, :],
                            mask=inside[:, None] & cmask[None, :], other=0.0).to(DTYPE)
                tl.store(DW + (pid * C + c) * K + k, tl.sum(dpre * x, axis=0), mask=cmask)
    tl.store(DX + b * stride_dxb + t[:, None] * stride_dxl + c[None, :],
             dx.to(DX.dtype.element_ty), mask=(t < L)[:, None] & cmask[None, :])


def _check_offsets(*tensors):
    """The kernels address elements with 32-bit offsets: refuse tensors that reach beyond them."""
    for t in tensors:
        if sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"causal_conv: a tensor of shape {tuple(t.shape)} is too large for "
                             "32-bit offsets; use a smaller batch")


def _launch_args(x, weight, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"x must be [B L C] with contiguous channels, got shape {tuple(x.shape)} "
                         f"and strides {x.stride()}")
    _check_offsets(x)
    batch, length, channels = x.shape
    width = weight.shape[-1]
    n_lblocks = triton.cdiv(length, BLOCK_L)
    grid = (batch * n_lblocks, triton.cdiv(channels, BLOCK_C))
    constants = {"K": width, "ACT": ACTIVATIONS.index(activation),
                 "DTYPE": tl.float64 if x.dtype == torch.float64 else tl.float32,
                 "BLOCK_L": BLOCK_L, "BLOCK_C": BLOCK_C, "num_warps": NUM_WARPS}
    return weight.reshape(channels, width).contiguous(), n_lblocks, grid, constants


def causal_conv_act(x, weight, bias, activation: str = "hardswish"):
    """x [B L C] (channels contiguous), weight [C 1 K] or [C K], bias [C] -> [B L C], contiguous."""
    w, n_lblocks, grid, constants = _launch_args(x, weight, activation)
    batch, length, channels = x.shape
    out = torch.empty((batch, length, channels), device=x.device, dtype=x.dtype)
    _causal_conv_fwd_kernel[grid](x, w, bias.contiguous(), out, length, channels, n_lblocks,
                                  x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                                  **constants)
    return out


def causal_conv_act_bwd(x, weight, bias, dout, activation: str = "hardswish", dx=None):
    """Gradients of :func:`causal_conv_act` given the output's, ``dout`` [B L C]: returns
    ``(dx, dweight, dbias)``; ``dx`` [B L C] (channels contiguous) is written if given."""
    w, n_lblocks, grid, constants = _launch_args(x, weight, activation)
    _, length, channels = x.shape
    if dout.shape != x.shape:
        raise ValueError(f"dout must be shaped like x {tuple(x.shape)}, got {tuple(dout.shape)}")
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif dx.shape != x.shape or dx.stride(-1) != 1:
        raise ValueError("dx must be shaped like x, with contiguous channels")
    _check_offsets(dout, dx)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dw = torch.empty((grid[0], channels, w.shape[1]), device=x.device, dtype=acc_dtype)
    db = torch.empty((grid[0], channels), device=x.device, dtype=acc_dtype)
    _causal_conv_bwd_kernel[grid](x, w, bias.contiguous(), dout, dx, dw, db, length, channels,
                                  n_lblocks, x.stride(0), x.stride(1), dout.stride(0),
                                  dout.stride(1), dx.stride(0), dx.stride(1), **constants)
    return dx, dw.sum(0).view_as(weight).to(weight.dtype), db.sum(0).to(bias.dtype)


def causal_conv_act_ref(x, weight, bias, activation: str = "hardswish"):
    """The reference: PyTorch's conv1d on [B C L] with K - 1 zeros in front, then the activation."""
    width = weight.shape[-1]
    weight = weight.reshape(weight.shape[0], 1, width)
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight, bias, groups=x.shape[-1])
    y = F.hardswish(y) if activation == "hardswish" else F.silu(y)
    return y.transpose(1, 2)
