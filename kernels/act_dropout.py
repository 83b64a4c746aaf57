"""An activation, then dropout, in one Triton kernel: the middle of the FFN, forward and backward.

``hidden = dropout(act(pre))`` on the FFN's [.. 4D] hidden layer (``act`` Hardswish or SiLU). As
PyTorch modules that is two passes forward, two backward, and autograd keeps three [.. 4D] tensors
for backward (the activation's input, the mask and fc2's input). Here:

- :func:`act_dropout`: one pass, ``hidden`` out;
- :func:`act_dropout_bwd`: from the gradient of ``hidden`` and ``pre``, one pass writes the
  gradient of ``pre`` and, when asked, ``hidden`` again (for fc2's weight gradient), so that
  forward need keep only ``pre`` and the call's seed: the mask is drawn again from it
  (:mod:`kernels.dropout`).

The kernels compute in float32 (float64 for float64) and write in the input's dtype: under
autocast, bfloat16 in and out, rounded once.

The reference is :func:`act_dropout_ref`; the tests hold both passes to it, with the mask of the
call's seed, in float64 (Triton's interpreter, on the CPU), in float32 on a GPU, and with bfloat16
inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import accumulation_dtypes, check_offsets
from kernels.activations import ACTIVATIONS, act_fn, act_grad
from kernels.dropout import BLOCK, check_probability, dropout_scale, keep_element


@triton.jit
def _act_dropout_fwd_kernel(PRE, SEED, OUT, numel, p, scale, ACT: tl.constexpr,
                            HAS_DROPOUT: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    out = act_fn(tl.load(PRE + offsets, mask=inside, other=0.0).to(DTYPE), ACT)
    if HAS_DROPOUT:
        out = tl.where(keep_element(SEED, offsets, p), out * scale, 0.0)
    tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def _act_dropout_bwd_kernel(DOUT, PRE, SEED, DPRE, OUT, numel, p, scale, ACT: tl.constexpr,
                            HAS_DROPOUT: tl.constexpr, STORE_OUT: tl.constexpr,
                            DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    pre = tl.load(PRE + offsets, mask=inside, other=0.0).to(DTYPE)
    grad = tl.load(DOUT + offsets, mask=inside, other=0.0).to(DTYPE)
    if HAS_DROPOUT:
        keep = keep_element(SEED, offsets, p)
        grad = tl.where(keep, grad * scale, 0.0)
    tl.store(DPRE + offsets, (grad * act_grad(pre, ACT)).to(DPRE.dtype.element_ty),
             mask=inside)
    if STORE_OUT:
        out = act_fn(pre, ACT)
        if HAS_DROPOUT:
            out = tl.where(keep, out * scale, 0.0)
        tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=inside)


def _launch(pre, p: float, activation: str) -> tuple[int, dict]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    check_probability(p)
    check_offsets("act_dropout", pre)
    constants = {"ACT": ACTIVATIONS.index(activation), "HAS_DROPOUT": p > 0,
                 "DTYPE": accumulation_dtypes(pre.dtype)[0],
                 "BLOCK": BLOCK}
    return triton.cdiv(pre.numel(), BLOCK), constants


def act_dropout(pre, p: float, seed, activation: str = "hardswish"):
    """``dropout(act(pre))`` with the mask of ``seed`` (None when p is 0); ``pre`` contiguous."""
    if not pre.is_contiguous():
        raise ValueError("pre must be contiguous: the mask is drawn at its elements' offsets")
    grid, constants = _launch(pre, p, activation)
    out = torch.empty_like(pre)
    if grid:
        _act_dropout_fwd_kernel[(grid,)](pre, seed, out, pre.numel(), p, dropout_scale(p),
                                         **constants)
    return out


def act_dropout_bwd(dout, pre, p: float, seed, activation: str = "hardswish",
                    recompute_output: bool = False, overwrite_dout: bool = False):
    """The gradient of ``pre`` given that of :func:`act_dropout`'s output, and that output again
    when ``recompute_output`` (else None): ``(dpre, out)``. ``overwrite_dout``: dpre is written
    over ``dout`` (or over its contiguous copy; each element is read before its own is written),
    one tensor the size of the hidden layer less at the FFN's backward."""
    grid, constants = _launch(pre, p, activation)
    if dout.shape != pre.shape:
        raise ValueError(f"dout must be shaped like pre {tuple(pre.shape)}, "
                         f"got {tuple(dout.shape)}")
    dout = dout.contiguous()
    dpre = dout if overwrite_dout else torch.empty_like(pre)
    out = torch.empty_like(pre) if recompute_output else None
    if grid:
        _act_dropout_bwd_kernel[(grid,)](dout, pre, seed, dpre, out, pre.numel(), p,
                                         dropout_scale(p), STORE_OUT=recompute_output, **constants)
    return dpre, out


def act_dropout_ref(pre, p: float, keep=None, activation: str = "hardswish"):
    """The reference in PyTorch: ``keep`` (bool, shaped like pre) is the dropout mask when p > 0."""
    out = torch.nn.functional.hardswish(pre) if activation == "hardswish" else (
        torch.nn.functional.silu(pre))
    if p > 0:
        out = out * keep / (1 - p) if p < 1 else out * 0
    return out
