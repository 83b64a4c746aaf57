"""Dropout masks drawn inside Triton kernels: one seed per call, a draw per element offset.

A kernel that applies dropout draws, for the element at flat offset ``i`` of a contiguous tensor,
``keep = rand(seed, i) >= p`` (Triton's Philox, ``tl.rand``) and scales kept elements by
``1 / (1 - p)``: the distribution of ``nn.Dropout``, not its draws. Backward draws the same mask
again from the seed instead of keeping it. The seed is a one-element tensor drawn from PyTorch's
generator on the tensor's device (:func:`draw_seed`), read by the kernel at run time, so each
replay of a CUDA graph draws a new mask. :func:`dropout_mask` gives the mask of a seed (the tests
build the references from it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import check_offsets

BLOCK = 1024


@triton.jit
def keep_element(SEED, offsets, p):
    """Whether dropout keeps each element: a uniform draw in [0, 1) at its offset, >= p."""
    return tl.rand(tl.load(SEED).to(tl.uint32), offsets) >= p


@triton.jit
def _mask_kernel(SEED, KEEP, numel, p, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(KEEP + offsets, keep_element(SEED, offsets, p).to(tl.int8), mask=offsets < numel)


def draw_seed(device) -> torch.Tensor:
    """The dropout seed of one call, [1] int64 on ``device``, from PyTorch's generator there."""
    return torch.randint(2**31 - 1, (1,), device=device, dtype=torch.int64)


def dropout_scale(p: float) -> float:
    """What kept elements are multiplied by: 1 / (1 - p), and 0 when everything is dropped."""
    return 1.0 / (1.0 - p) if p < 1 else 0.0


def check_probability(p: float) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")


def dropout_mask(seed: torch.Tensor, shape, p: float) -> torch.Tensor:
    """The keep mask (bool, ``shape``) that ``seed`` gives a contiguous tensor at probability p."""
    keep = torch.empty(shape, device=seed.device, dtype=torch.int8)
    check_offsets("dropout_mask", keep)
    if keep.numel():
        _mask_kernel[(triton.cdiv(keep.numel(), BLOCK),)](seed, keep, keep.numel(), p, BLOCK=BLOCK)
    return keep.bool()
