"""The gradient of an embedding table from the gradient of its looked-up rows, in one Triton kernel.

``grad_weight[i] = sum of grad[t] over the positions t with indices[t] == i``, and zero at
``padding_idx``. PyTorch computes it without atomics: it sorts the indices, then sums each run of
equal indices in parts, and sums the parts. At TiM4Rec's training sizes (hundreds of thousands of
positions of a few thousand items, a large share of them padding) its summing kernel is held back
by the long runs (padding, popular items) that it sums in series (BENCHMARKS.md, History: commit
4342260).
This kernel adds each position's row into the table with atomic additions, skipping padding: one
pass over ``grad``. The order of the additions varies from run to run, so the result does in its
last bits; :func:`embedding_grad` leaves the work to PyTorch when deterministic algorithms are
asked for (``torch.use_deterministic_algorithms``).

The reference is :func:`embedding_grad_ref`, PyTorch's own; the tests hold the kernel to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import accumulation_dtypes, check_offsets, row_blocks

BLOCK_ELEMENTS = 2048  # elements per program: 32 rows of 64, 8 rows of 256


@triton.jit
def _embedding_grad_kernel(IDX, G, DW, M, N, padding_idx, stride_g,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    idx = tl.load(IDX + rows, mask=rows < M, other=padding_idx)
    inside = ((rows < M) & (idx != padding_idx))[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=inside, other=0.0)
    tl.atomic_add(DW + idx[:, None] * N + cols[None, :], g.to(DW.dtype.element_ty), mask=inside,
                  sem="relaxed")


def embedding_grad(indices, grad, num_rows: int, padding_idx: int | None = None,
                   dtype: torch.dtype | None = None):
    """The gradient of a [num_rows N] table whose rows ``indices`` [..] were looked up, from their
    gradient ``grad`` [.. N]: [num_rows N], zero at ``padding_idx``, in ``dtype`` (the table's;
    default: grad's).

    Summed in float32 for a half-precision ``grad`` (a float32 table's gradient then keeps those
    sums unrounded), in float64 for float64.
    """
    dtype = grad.dtype if dtype is None else dtype
    if torch.are_deterministic_algorithms_enabled():
        return embedding_grad_ref(indices, grad, num_rows, padding_idx).to(dtype)
    width = grad.shape[-1]
    grid, block_m, block_n = row_blocks("embedding_grad", indices.numel(), width, BLOCK_ELEMENTS)
    if indices.shape != grad.shape[:-1]:
        raise ValueError(f"embedding_grad: indices of shape {tuple(indices.shape)} do not match "
                         f"a gradient of shape {tuple(grad.shape)}")
    indices, grad = indices.reshape(-1), grad.reshape(-1, width)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    out = torch.zeros(num_rows, width, device=grad.device, dtype=accumulation_dtypes(grad.dtype)[1])
    check_offsets("embedding_grad", grad, out)
    if grid:
        _embedding_grad_kernel[(grid,)](
            indices, grad, out, indices.numel(), width, -1 if padding_idx is None else padding_idx,
            grad.stride(0), BLOCK_M=block_m, BLOCK_N=block_n)
    return out.to(dtype)


def embedding_grad_ref(indices, grad, num_rows: int, padding_idx: int | None = None):
    """PyTorch's gradient of ``F.embedding(indices, weight, padding_idx)``'s weight."""
    return torch.ops.aten.embedding_dense_backward(
        grad, indices, num_rows, -1 if padding_idx is None else padding_idx, False)
