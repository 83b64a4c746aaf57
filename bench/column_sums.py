"""Column sums of tall matrices on a GPU: PyTorch's ``sum(0)`` against a matrix-vector product.

    python bench/column_sums.py

The bias gradients of TiM4Rec's projections are such sums over every position of the batch
([T N], T = batch x L): :func:`ssd.column_sums`. Prints the median time of each over 20 calls
and the bandwidth it reaches, for the shapes of the three settings of bench/gpu_speed.py.
"""

from __future__ import annotations

import functools

import torch

from gpu_speed import median_cuda_ms  # the benchmark beside this one

median_ms = functools.partial(median_cuda_ms, warmup=3)  # after 3 untimed calls

SHAPES = [(409600, 196, "b: in_proj without z"), (409600, 256, "b: fc1"),
          (409600, 128, "b: in_proj's z"), (409600, 64, "b: out_proj, fc2"),
          (102400, 64, "a: out_proj, fc2"), (102400, 1024, "c: fc1")]


def main() -> None:
    print("| T x N | what | sum(0) ms | GB/s | mv ms | GB/s | max abs difference |")
    print("|---|---|---|---|---|---|---|")
    for rows, cols, what in SHAPES:
        m = torch.randn(rows, cols, device="cuda")
        ones = m.new_ones(rows)
        by_sum = median_ms(lambda m=m: m.sum(0))
        by_mv = median_ms(lambda m=m, ones=ones: torch.mv(m.t(), ones))
        gb = m.numel() * 4 / 1e9
        diff = (m.sum(0) - torch.mv(m.t(), ones)).abs().max().item()
        print(f"| {rows} x {cols} | {what} | {by_sum:.3f} | {gb / by_sum * 1e3:.0f} | "
              f"{by_mv:.3f} | {gb / by_mv * 1e3:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
