"""Triton kernels of this project, each beside its PyTorch reference.

The kernel modules import Triton (a GPU install); the ``*_ref`` modules (the causal convolution's,
the gated RMSNorm's, the selective scan's) import only PyTorch: the CPU path runs them, and the
tests hold the kernels to them.
"""

import torch

MAX_WIDTH = 8192  # the widest rows that the kernels over rows take in one block


def check_offsets(what: str, *tensors) -> None:
    """The kernels address elements with 32-bit offsets: refuse tensors that reach beyond them
    (``what`` names the caller in the error)."""
    for t in tensors:
        if sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"{what}: a tensor of shape {tuple(t.shape)} is too large for 32-bit "
                             "offsets; use a smaller batch")


def row_blocks(what: str, rows: int, width: int, block_elements: int) -> tuple[int, int, int]:
    """``(grid, BLOCK_M, BLOCK_N)`` for a kernel that takes blocks of whole rows, about
    ``block_elements`` elements a program; refuses rows wider than :data:`MAX_WIDTH` (or empty)."""
    if not 0 < width <= MAX_WIDTH:
        raise ValueError(f"{what}: the last axis must have 1 to {MAX_WIDTH} elements, got {width}")
    block_n = 1 << (width - 1).bit_length()  # the next power of two
    block_m = max(1, block_elements // block_n)
    return -(-rows // block_m), block_m, block_n


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that the PyTorch references compute in: float32 for half inputs (as the kernels
    accumulate), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def accumulation_dtypes(dtype: torch.dtype) -> tuple:
    """``(Triton dtype, torch dtype)`` that a kernel computes and sums in: float64 for float64
    tensors (the interpreter tests), float32 for every other dtype."""
    import triton.language as tl

    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)
