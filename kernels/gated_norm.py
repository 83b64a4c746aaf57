"""The SSD block's gated RMSNorm in one Triton kernel each way, a block of rows per program.

``out = g / rms(g) * weight`` with ``g = y * silu(z)``, over the last axis of [M E] rows (one group:
``RMSNormGated(E, norm_before_gate=False)`` of mamba-ssm). mamba-ssm's own kernels take one row per
program, which leaves its backward far from the memory bandwidth at TiM4Rec's widths (E = 128 at
64d; BENCHMARKS.md, History: commit 4342260).
These take a block of rows per program and pass over each tensor once:

- :func:`gated_rms_norm` writes ``out`` and each row's ``1/rms``;
- :func:`gated_rms_norm_bwd` writes the gradients of y and z and ``out`` again (out_proj's weight
  gradient needs it, and :class:`ssd_ops.fused_block.FusedSSDBlock` does not keep it); the
  weight's gradient is summed per block of rows, then over blocks by PyTorch: no atomics.

The statistics and the products are float32 (float64 for float64 rows); ``out`` and the gradients
of y and z are in y's dtype (bfloat16 under autocast), the weight's in its own.

The reference is :func:`kernels.gated_norm_ref.gated_rmsnorm_ref`; the tests hold both passes to it
in float64 (Triton's interpreter, on the CPU), in float32 on a GPU, and with bfloat16 rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import accumulation_dtypes, check_offsets, row_blocks

BLOCK_ELEMENTS = 4096  # elements per program: 32 rows of 128, 8 rows of 512


@triton.jit
def _gated_norm_fwd_kernel(Y, Z, W, OUT, RSTD, M, N, stride_y, stride_z, eps, DTYPE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=inside, other=0.0).to(DTYPE)
    z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=inside, other=0.0).to(DTYPE)
    g = y * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(DTYPE)
    tl.store(OUT + offsets, (g * rstd[:, None] * w[None, :]).to(OUT.dtype.element_ty), mask=inside)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _gated_norm_bwd_kernel(DOUT, Y, Z, W, RSTD, DY, DZ, OUT, DW, M, N, stride_y, stride_z,
                           DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=inside, other=0.0).to(DTYPE)
    z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=inside, other=0.0).to(DTYPE)
    dout = tl.load(DOUT + offsets, mask=inside, other=0.0).to(DTYPE)
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0).to(DTYPE)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(DTYPE)
    sig = tl.sigmoid(z)
    silu = z * sig
    ghat = y * silu * rstd[:, None]  # g / rms(g)
    dghat = dout * w[None, :]
    # d(g / rms(g)) / dg: (dghat - ghat * mean(dghat * ghat)) / rms(g)
    dg = (dghat - ghat * (tl.sum(dghat * ghat, axis=1) / N)[:, None]) * rstd[:, None]
    tl.store(DY + offsets, (dg * silu).to(DY.dtype.element_ty), mask=inside)
    dsilu = sig * (1.0 + z * (1.0 - sig))
    tl.store(DZ + offsets, (dg * y * dsilu).to(DZ.dtype.element_ty), mask=inside)
    tl.store(OUT + offsets, (ghat * w[None, :]).to(OUT.dtype.element_ty), mask=inside)
    tl.store(DW + pid * N + cols, tl.sum(dout * ghat, axis=0), mask=cols < N)


def _launch(y, z, weight):
    """Check the rows; the grid size, the block constants and the accumulation dtype."""
    if y.dim() != 2 or z.shape != y.shape or weight.shape != y.shape[-1:]:
        raise ValueError(f"gated_rms_norm: y and z must be [M E] rows and weight [E], got "
                         f"{tuple(y.shape)}, {tuple(z.shape)} and {tuple(weight.shape)}")
    grid, block_m, block_n = row_blocks("gated_rms_norm", y.shape[0], y.shape[-1], BLOCK_ELEMENTS)
    if y.stride(-1) != 1 or z.stride(-1) != 1:
        raise ValueError("gated_rms_norm: the rows of y and z must be contiguous")
    check_offsets("gated_rms_norm", y, z)
    tl_dtype, acc = accumulation_dtypes(y.dtype)
    return grid, {"BLOCK_M": block_m, "BLOCK_N": block_n, "DTYPE": tl_dtype,
                  "num_warps": min(16, max(4, block_n // 256))}, acc


def gated_rms_norm(y, z, weight, eps: float):
    """``RMSNorm(y * silu(z)) * weight`` over rows [M E] (each row contiguous, rows at any
    stride: z may be a slice of in_proj's output): ``(out [M E], 1/rms [M])``."""
    grid, constants, acc = _launch(y, z, weight)
    out = torch.empty_like(y)
    rstd = torch.empty(y.shape[0], device=y.device, dtype=acc)
    if y.shape[0]:
        _gated_norm_fwd_kernel[(grid,)](y, z, weight.contiguous(), out, rstd, y.shape[0],
                                        y.shape[1], y.stride(0), z.stride(0), eps, **constants)
    return out, rstd


def gated_rms_norm_bwd(dout, y, z, weight, rstd, dz):
    """Backward of :func:`gated_rms_norm` from its ``1/rms``: writes z's gradient into ``dz``
    (contiguous, shaped like z) and returns ``(dy, dweight, out)``, ``out`` computed again."""
    grid, constants, acc = _launch(y, z, weight)
    if dout.shape != y.shape:
        raise ValueError(f"gated_rms_norm_bwd: dout must be shaped like y {tuple(y.shape)}, got "
                         f"{tuple(dout.shape)}")
    if dz.shape != z.shape or not dz.is_contiguous():
        raise ValueError("gated_rms_norm_bwd: dz must be a contiguous tensor shaped like z")
    dout = dout.contiguous()
    dy, out = torch.empty_like(y), torch.empty_like(y)
    dw = torch.empty((grid, y.shape[1]), device=y.device, dtype=acc)
    if y.shape[0]:
        _gated_norm_bwd_kernel[(grid,)](dout, y, z, weight.contiguous(), rstd, dy, dz, out, dw,
                                        y.shape[0], y.shape[1], y.stride(0), z.stride(0),
                                        **constants)
    return dy, dw.sum(0).to(weight.dtype), out
