"""Depthwise causal convolution over the sequence, then an activation, on [B L C] tensors (Triton).

TiM4Rec's in_proj writes x, B and C as [B L C] rows, and mamba-ssm's scan reads them so. PyTorch's
depthwise ``conv1d`` wants [B C L]: with it, every pass (forward, the recomputation in backward, the
backward itself) adds transposed copies of the whole tensor, and its depthwise kernels are slow at
this size (BENCHMARKS.md, History: commit fe9c268).
These two kernels read and write the [B L C] layout directly, with any row stride (in_proj's output
is read in place):

- :func:`causal_conv_act`: ``act(b_c + sum_k w_ck x_{t-K+1+k, c})``, zero before the first step
  (with ``seq_idx``, sequences laid end to end: zero before the first step of each);
- :func:`causal_conv_act_bwd`: from the output's gradient, the gradients of x (written where the
  caller says, e.g. into a slice of in_proj's output gradient), of the weight and of the bias. The
  pre-activation is computed again from x (K more reads, from cache), so forward keeps nothing;
  its gradient is written first (where the caller allows, over the output's gradient), then read
  by the pass that computes the three others;
- :func:`causal_conv_act_fn`: the two as one function for autograd.

The kernels compute in float32 (float64 for float64 x) whatever the weights' dtype, and write x's
dtype: under autocast, in_proj's bfloat16 output in, bfloat16 out, float32 weight and bias
gradients.

The reference is :func:`kernels.causal_conv_ref.causal_conv_act_ref` (PyTorch, differentiated by
autograd); the tests hold both kernels to it in float64 (Triton's interpreter, on the CPU), in
float32 on a GPU, and with bfloat16 x. Weight and bias gradients are summed per block of steps,
then over blocks by PyTorch: no atomics, the same result on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import accumulation_dtypes, check_offsets
from kernels.activations import ACTIVATIONS, act_fn, act_grad

BLOCK_ELEMENTS, MAX_BLOCK_C, NUM_WARPS = 2048, 64, 4


@triton.jit
def _same_sequence(seq_row0, t, src, L, HAS_SEQ: tl.constexpr):
    """Whether the steps src [BL] lie in the sequence of the steps t [BL] (always, without
    seq_idx); both inside [0, L)."""
    inside = (src >= 0) & (src < L)
    if HAS_SEQ:
        here = tl.load(seq_row0 + t, mask=t < L, other=-1)
        there = tl.load(seq_row0 + src, mask=inside, other=-2)
        inside = inside & (here == there)
    return inside


@triton.jit
def _pre_activation(x_row0, seq_row0, W, bias, t, c, cmask, L, stride_xl, K: tl.constexpr,
                    HAS_SEQ: tl.constexpr, DTYPE: tl.constexpr):
    """b_c + sum_k w_ck x_{t-K+1+k, c} for the steps t [BL] and channels c [BC] of one row of the
    batch (over steps of t's own sequence only, with seq_idx)."""
    acc = tl.zeros((t.shape[0], c.shape[0]), DTYPE) + bias[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        inside = _same_sequence(seq_row0, t, src, L, HAS_SEQ)
        x = tl.load(x_row0 + src[:, None] * stride_xl + c[None, :],
                    mask=inside[:, None] & cmask[None, :], other=0.0).to(DTYPE)
        w = tl.load(W + c * K + k, mask=cmask, other=0.0).to(DTYPE)
        acc += x * w[None, :]
    return acc


@triton.jit
def _tile(n_lblocks, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's sequence, steps [BL] and channels [BC]."""
    pid = tl.program_id(0)
    t = (pid % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    return pid // n_lblocks, t, tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)


@triton.jit
def _causal_conv_fwd_kernel(X, SEQ, W, BIAS, OUT, L, C, n_lblocks, stride_xb, stride_xl,
                            stride_ob, stride_ol, K: tl.constexpr, ACT: tl.constexpr,
                            HAS_SEQ: tl.constexpr, DTYPE: tl.constexpr, BLOCK_L: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    b, t, c = _tile(n_lblocks, BLOCK_L, BLOCK_C)
    cmask = c < C
    bias = tl.load(BIAS + c, mask=cmask, other=0.0).to(DTYPE)
    pre = _pre_activation(X + b * stride_xb, SEQ + b * L, W, bias, t, c, cmask,
                          L, stride_xl, K, HAS_SEQ, DTYPE)
    tl.store(OUT + b * stride_ob + t[:, None] * stride_ol + c[None, :],
             act_fn(pre, ACT).to(OUT.dtype.element_ty), mask=(t < L)[:, None] & cmask[None, :])


@triton.jit
def _causal_conv_dpre_kernel(X, SEQ, W, BIAS, DOUT, DPRE, L, C, n_lblocks, stride_xb, stride_xl,
                             stride_gb, stride_gl, stride_pb, stride_pl, K: tl.constexpr,
                             ACT: tl.constexpr, HAS_SEQ: tl.constexpr, DTYPE: tl.constexpr,
                             BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """The pre-activation's gradient, ``dout * act'(pre)``; DPRE may be DOUT (in place)."""
    b, t, c = _tile(n_lblocks, BLOCK_L, BLOCK_C)
    cmask = c < C
    inside = (t < L)[:, None] & cmask[None, :]
    bias = tl.load(BIAS + c, mask=cmask, other=0.0).to(DTYPE)
    pre = _pre_activation(X + b * stride_xb, SEQ + b * L, W, bias, t, c, cmask,
                          L, stride_xl, K, HAS_SEQ, DTYPE)
    g = tl.load(DOUT + b * stride_gb + t[:, None] * stride_gl + c[None, :], mask=inside,
                other=0.0).to(DTYPE)
    tl.store(DPRE + b * stride_pb + t[:, None] * stride_pl + c[None, :],
             (g * act_grad(pre, ACT)).to(DPRE.dtype.element_ty), mask=inside)


@triton.jit
def _causal_conv_dx_kernel(X, SEQ, W, DPRE, DX, DW, DB, L, C, n_lblocks, stride_xb, stride_xl,
                           stride_pb, stride_pl, stride_dxb, stride_dxl, K: tl.constexpr,
                           HAS_SEQ: tl.constexpr, DTYPE: tl.constexpr, BLOCK_L: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """From the pre-activation's gradient: x's (``sum_m dpre_{t+m} w_{K-1-m}``, over the steps
    t + m of t's sequence), and this block's share of the weight's and the bias's."""
    b, t, c = _tile(n_lblocks, BLOCK_L, BLOCK_C)
    pid, cmask = tl.program_id(0), c < C
    dpre_row0, x_row0 = DPRE + b * stride_pb, X + b * stride_xb
    seq_row0 = SEQ + b * L
    dx = tl.zeros((BLOCK_L, BLOCK_C), DTYPE)
    for m in tl.static_range(K):
        s = t + m
        g = tl.load(dpre_row0 + s[:, None] * stride_pl + c[None, :],
                    mask=_same_sequence(seq_row0, t, s, L, HAS_SEQ)[:, None] & cmask[None, :],
                    other=0.0).to(DTYPE)
        w = tl.load(W + c * K + (K - 1 - m), mask=cmask, other=0.0).to(DTYPE)
        dx += g * w[None, :]
        if m == 0:
            tl.store(DB + pid * C + c, tl.sum(g, axis=0), mask=cmask)
            for k in tl.static_range(K):
                src = t - (K - 1) + k
                inside = _same_sequence(seq_row0, t, src, L, HAS_SEQ)
                x = tl.load(x_row0 + src[:, None] * stride_xl + c[None, :],
                            mask=inside[:, None] & cmask[None, :], other=0.0).to(DTYPE)
                tl.store(DW + (pid * C + c) * K + k, tl.sum(g * x, axis=0), mask=cmask)
    tl.store(DX + b * stride_dxb + t[:, None] * stride_dxl + c[None, :],
             dx.to(DX.dtype.element_ty), mask=(t < L)[:, None] & cmask[None, :])


def _launch_args(x, weight, activation, seq_idx=None):
    """Blocks of up to 64 channels, by as many steps as make 2048 elements (fewer than the
    sequence's length, rounded up to a power of two): few channels (the time branch's 4) take
    long blocks of steps."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"x must be [B L C] with contiguous channels, got shape {tuple(x.shape)} "
                         f"and strides {x.stride()}")
    check_offsets("causal_conv", x)
    batch, length, channels = x.shape
    if seq_idx is not None and (seq_idx.shape != (batch, length) or not seq_idx.is_contiguous()):
        raise ValueError(f"seq_idx must be a contiguous [B L] = {(batch, length)} tensor, got "
                         f"shape {tuple(seq_idx.shape)}")
    # Without seq_idx the kernels never read SEQ, but a compiled kernel takes no None pointer.
    seq = x if seq_idx is None else seq_idx
    width = weight.shape[-1]
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(channels))
    block_l = min(BLOCK_ELEMENTS // block_c, max(16, triton.next_power_of_2(length)))
    n_lblocks = triton.cdiv(length, block_l)
    grid = (batch * n_lblocks, triton.cdiv(channels, block_c))
    constants = {"K": width, "HAS_SEQ": seq_idx is not None,
                 "DTYPE": accumulation_dtypes(x.dtype)[0],
                 "BLOCK_L": block_l, "BLOCK_C": block_c, "num_warps": NUM_WARPS}
    return weight.reshape(channels, width).contiguous(), seq, n_lblocks, grid, constants


def causal_conv_act(x, weight, bias, activation: str = "hardswish", seq_idx=None):
    """x [B L C] (channels contiguous), weight [C 1 K] or [C K], bias [C] -> [B L C], contiguous;
    ``seq_idx`` [B L] (optional): the sequences laid end to end in each row."""
    w, seq, n_lblocks, grid, constants = _launch_args(x, weight, activation, seq_idx)
    batch, length, channels = x.shape
    out = torch.empty((batch, length, channels), device=x.device, dtype=x.dtype)
    _causal_conv_fwd_kernel[grid](x, seq, w, bias.contiguous(), out, length, channels,
                                  n_lblocks,
                                  x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                                  ACT=ACTIVATIONS.index(activation), **constants)
    return out


def causal_conv_act_bwd(x, weight, bias, dout, activation: str = "hardswish", dx=None,
                        overwrite_dout: bool = False, seq_idx=None):
    """Gradients of :func:`causal_conv_act` given the output's, ``dout`` [B L C]: returns
    ``(dx, dweight, dbias)``; ``dx`` [B L C] (channels contiguous) is written if given.

    Two passes: the pre-activation's gradient (into ``dout`` itself with ``overwrite_dout``, else
    into a new tensor), then the three gradients from it.
    """
    w, seq, n_lblocks, grid, constants = _launch_args(x, weight, activation, seq_idx)
    _, length, channels = x.shape
    if dout.shape != x.shape:
        raise ValueError(f"dout must be shaped like x {tuple(x.shape)}, got {tuple(dout.shape)}")
    if dout.stride(-1) != 1:
        dout, overwrite_dout = dout.contiguous(), True
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif dx.shape != x.shape or dx.stride(-1) != 1:
        raise ValueError("dx must be shaped like x, with contiguous channels")
    check_offsets("causal_conv", dout, dx)
    dpre = dout if overwrite_dout else torch.empty_like(dout)
    _causal_conv_dpre_kernel[grid](x, seq, w, bias.contiguous(), dout, dpre, length, channels,
                                   n_lblocks, x.stride(0), x.stride(1), dout.stride(0),
                                   dout.stride(1), dpre.stride(0), dpre.stride(1),
                                   ACT=ACTIVATIONS.index(activation), **constants)
    acc_dtype = accumulation_dtypes(x.dtype)[1]
    dw = torch.empty((grid[0], channels, w.shape[1]), device=x.device, dtype=acc_dtype)
    db = torch.empty((grid[0], channels), device=x.device, dtype=acc_dtype)
    _causal_conv_dx_kernel[grid](x, seq, w, dpre, dx, dw, db, length, channels, n_lblocks,
                                 x.stride(0), x.stride(1), dpre.stride(0), dpre.stride(1),
                                 dx.stride(0), dx.stride(1), **constants)
    return dx, dw.sum(0).view_as(weight).to(weight.dtype), db.sum(0).to(bias.dtype)


class _CausalConvAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation: str):
        ctx.save_for_backward(x, weight, bias)
        ctx.activation = activation
        return causal_conv_act(x, weight, bias, activation)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        return (*causal_conv_act_bwd(x, weight, bias, dout, ctx.activation), None)


def causal_conv_act_fn(x, weight, bias, activation: str = "hardswish"):
    """:func:`causal_conv_act` with its backward for autograd (x, weight and bias)."""
    return _CausalConvAct.apply(x, weight, bias, activation)
