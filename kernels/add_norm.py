"""Dropout, residual and LayerNorm in one Triton kernel, forward and backward.

``y = LayerNorm(dropout(x) + residual)`` over the last axis of [.. N] rows. Each TiM4Rec layer ends
so twice (after the SSD block and after the FFN). As PyTorch modules that is a dropout (a mask
and a product), an addition and a LayerNorm, each a pass over the tensors forward and backward,
and PyTorch's LayerNorm kernels are slow at N = 64. mamba-ssm's fused ``layer_norm_fn`` does the
same maths with one row per program, which leaves its backward bound by latency at this width
(BENCHMARKS.md, History: commit b48e3b4). These kernels take a
block of rows per program and pass over each tensor once:

- :func:`dropout_add_norm` forward keeps ``s = dropout(x) + residual`` and each row's mean and
  1/std; the dropout mask is drawn again in backward from the call's seed (:mod:`kernels.dropout`);
- backward writes the gradients of x and of the residual; those of the weight and the bias are
  summed per block of rows, then over blocks by PyTorch: no atomics, the same result on every run.

Precision: the sum, the statistics and ``y`` are in the widest dtype of x, the residual and the
weight, float32 at least, and so is what is kept for backward; x's gradient comes out in x's
dtype and the residual's in its own. Under autocast, x is a product's bfloat16 output, and the
residual stream and the LayerNorm stay float32, as autocast runs LayerNorm on a GPU; the kernels
read x as it is (no float32 copy) and set the dtypes themselves, on any device.

The reference is :func:`dropout_add_norm_ref`; the tests hold both passes to it, with the mask of
the call's seed, in float64 (Triton's interpreter, on the CPU) and in float32 on a GPU, and with a
bfloat16 x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import accumulation_dtypes, check_offsets, row_blocks
from kernels.dropout import check_probability, draw_seed, dropout_scale, keep_element

BLOCK_ELEMENTS = 2048  # elements per program: 32 rows of 64, 8 rows of 256


# has_res and store_dres are run-time flags, not constants: the layer ends (with a residual)
# and the model's input (without) share one compiled kernel each way (one compilation less each
# on a cold start).
@triton.jit(do_not_specialize=["has_res"])
def _add_norm_fwd_kernel(X, RES, W, B, SEED, Y, S, MEAN, RSTD, M, N, eps, p, scale, has_res,
                         HAS_DROPOUT: tl.constexpr, STORE_SUM: tl.constexpr,
                         DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    s = tl.load(X + offsets, mask=inside, other=0.0).to(DTYPE)
    if HAS_DROPOUT:
        s = tl.where(keep_element(SEED, offsets, p), s * scale, 0.0)
    if has_res:
        s += tl.load(RES + offsets, mask=inside, other=0.0).to(DTYPE)
    if STORE_SUM:
        tl.store(S + offsets, s.to(S.dtype.element_ty), mask=inside)
    mean = tl.sum(s, axis=1) / N
    centred = tl.where(inside, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(DTYPE)
    b = tl.load(B + cols, mask=cols < N, other=0.0).to(DTYPE)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(MEAN + rows, mean, mask=rows < M)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit(do_not_specialize=["store_dres"])
def _add_norm_bwd_kernel(S, W, DY, MEAN, RSTD, SEED, DX, DRES, DW, DB, M, N, p, scale, store_dres,
                         HAS_DROPOUT: tl.constexpr, DTYPE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    s = tl.load(S + offsets, mask=inside, other=0.0).to(DTYPE)
    dy = tl.load(DY + offsets, mask=inside, other=0.0).to(DTYPE)
    mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(DTYPE)
    xhat = tl.where(inside, (s - mean[:, None]) * rstd[:, None], 0.0)
    wdy = w[None, :] * dy
    mean_xhat_wdy = tl.sum(xhat * wdy, axis=1) / N
    mean_wdy = tl.sum(wdy, axis=1) / N
    ds = (wdy - xhat * mean_xhat_wdy[:, None] - mean_wdy[:, None]) * rstd[:, None]
    if store_dres:
        tl.store(DRES + offsets, ds.to(DRES.dtype.element_ty), mask=inside)
    if HAS_DROPOUT:
        ds = tl.where(keep_element(SEED, offsets, p), ds * scale, 0.0)
    tl.store(DX + offsets, ds.to(DX.dtype.element_ty), mask=inside)
    tl.store(DW + pid * N + cols, tl.sum(dy * xhat, axis=0), mask=cols < N)
    tl.store(DB + pid * N + cols, tl.sum(dy, axis=0), mask=cols < N)


def _blocks(rows: int, width: int) -> tuple[int, dict]:
    """The grid size and the block constants for ``rows`` rows of ``width``."""
    grid, block_m, block_n = row_blocks("dropout_add_norm", rows, width, BLOCK_ELEMENTS)
    return grid, {"BLOCK_M": block_m, "BLOCK_N": block_n,
                  "num_warps": min(16, max(4, block_n // 512))}


def sum_dtype(x, residual, weight) -> torch.dtype:
    """The dtype of the sum and of the output: the widest of the inputs', float32 at least."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    return dtype if residual is None else torch.promote_types(dtype, residual.dtype)


def _forward(x, residual, weight, bias, eps: float, p: float, seed, keep_sum: bool):
    """Rows [M N] in; ``(y, s or None, mean, rstd)`` out."""
    rows, width = x.shape
    grid, constants = _blocks(rows, width)
    dtype = sum_dtype(x, residual, weight)
    tl_dtype, acc = accumulation_dtypes(dtype)
    y = torch.empty(x.shape, device=x.device, dtype=dtype)
    s = torch.empty_like(y) if keep_sum else None
    mean = torch.empty(rows, device=x.device, dtype=acc)
    rstd = torch.empty(rows, device=x.device, dtype=acc)
    if rows:
        _add_norm_fwd_kernel[(grid,)](
            x, x if residual is None else residual, weight, bias, seed, y, s, mean, rstd, rows,
            width, eps, p, dropout_scale(p), int(residual is not None), HAS_DROPOUT=p > 0,
            STORE_SUM=keep_sum, DTYPE=tl_dtype, **constants)
    return y, s, mean, rstd


class _DropoutAddNorm(torch.autograd.Function):
    # No autocast decorators: the dtypes are the inputs' (see the module's docstring), under
    # autocast or not, on any device.
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, p: float):
        seed = draw_seed(x.device) if p > 0 else None
        y, s, mean, rstd = _forward(x, residual, weight, bias, eps, p, seed, keep_sum=True)
        ctx.save_for_backward(s, weight, mean, rstd, seed)
        ctx.p, ctx.has_residual = p, residual is not None
        ctx.x_dtype, ctx.residual_dtype = x.dtype, None if residual is None else residual.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # [M N]
        s, weight, mean, rstd, seed = ctx.saved_tensors
        rows, width = s.shape
        grid, constants = _blocks(rows, width)
        tl_dtype, acc = accumulation_dtypes(s.dtype)
        dy = dy.contiguous()
        dx = torch.empty(s.shape, device=s.device, dtype=ctx.x_dtype)
        # Without dropout, the residual's gradient is x's: one tensor for both (of one dtype).
        dres = None
        if ctx.has_residual and (ctx.p > 0 or ctx.residual_dtype != ctx.x_dtype):
            dres = torch.empty(s.shape, device=s.device, dtype=ctx.residual_dtype)
        dw = torch.empty((grid, width), device=s.device, dtype=acc)
        db = torch.empty((grid, width), device=s.device, dtype=acc)
        if rows:
            _add_norm_bwd_kernel[(grid,)](
                s, weight, dy, mean, rstd, seed, dx, dx if dres is None else dres, dw, db, rows,
                width, ctx.p, dropout_scale(ctx.p), int(dres is not None), HAS_DROPOUT=ctx.p > 0,
                DTYPE=tl_dtype, **constants)
        if ctx.has_residual and dres is None:
            dres = dx
        return dx, dres, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None, None


def dropout_add_norm(x, residual, weight, bias, eps: float, p: float):
    """``layer_norm(dropout(x, p) + residual)`` over the last axis (no residual when None);
    ``x`` and ``residual`` [.. N], ``weight`` and ``bias`` [N]. ``p`` 0 is no dropout (evaluation).
    The result is in :func:`sum_dtype` (float32 for a bfloat16 ``x`` and float32 weights)."""
    check_probability(p)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must be shaped like x {tuple(x.shape)}")
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).contiguous()
    res = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
    check_offsets("dropout_add_norm", rows)
    weight, bias = weight.contiguous(), bias.contiguous()
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, weight, bias))
    if grads:
        y = _DropoutAddNorm.apply(rows, res, weight, bias, eps, p)
    else:  # keeps nothing for backward
        seed = draw_seed(x.device) if p > 0 else None
        y = _forward(rows, res, weight, bias, eps, p, seed, keep_sum=False)[0]
    return y.view(shape)


def dropout_add_norm_ref(x, residual, weight, bias, eps: float, p: float, keep=None):
    """The reference in PyTorch: ``keep`` (bool, shaped like x) is the dropout mask when p > 0."""
    if p > 0:
        x = x * keep / (1 - p) if p < 1 else x * 0
    s = x if residual is None else x + residual
    return torch.nn.functional.layer_norm(s, s.shape[-1:], weight, bias, eps)
