"""Parts of TiM4Rec's backward pass on a GPU, each against an alternative that computes the same.

    python bench/backward_parts.py

- Weight gradients of the projections, ``dy.t() @ x`` over T = batch x L positions: one cuBLAS
  product (small output, huge inner dimension) against the positions split into groups, one
  batched product and a sum over the groups (split-K by hand). On an H100, cuBLAS's single
  product is the faster at 64d and within 8% at 256d, so the model keeps it.
- The item embedding's gradient: PyTorch's (sort, then sums of runs) against
  :func:`kernels.embedding_grad.embedding_grad` (atomic additions), at the shares of padding and
  the item counts of the settings.
- The gated RMSNorm, forward and backward: mamba-ssm's kernels (one row per program) against
  :mod:`kernels.gated_norm` (a block of rows per program).

Prints the median time of each over 20 calls, and the largest difference from a float64 result.
"""

from __future__ import annotations

import functools

import torch

from gpu_speed import median_cuda_ms  # the benchmark beside this one

median_ms = functools.partial(median_cuda_ms, warmup=3)  # after 3 untimed calls

# (T, rows of the gradient, columns, what): dW [rows cols] = dy [T rows]^T @ x [T cols]
PRODUCTS = [(409600, 128, 64, "b: in_proj's z"), (409600, 196, 64, "b: in_proj without z"),
            (409600, 64, 128, "b: out_proj"), (409600, 256, 64, "b: fc1"),
            (409600, 64, 256, "b: fc2"), (102400, 196, 64, "a: in_proj without z"),
            (102400, 256, 64, "a: fc1"), (102400, 512, 256, "c: in_proj's z"),
            (102400, 592, 256, "c: in_proj without z"), (102400, 256, 512, "c: out_proj"),
            (102400, 1024, 256, "c: fc1"), (102400, 256, 1024, "c: fc2")]
# (T, E, what)
NORMS = [(409600, 128, "b"), (102400, 128, "a"), (102400, 512, "c")]
# (T, items, share of padding, what)
LOOKUPS = [(409600, 3267, 0.5, "b"), (102400, 18358, 0.5, "a"), (102400, 3267, 0.5, "c"),
           (409600, 3267, 0.0, "b, no padding")]


def split_product(dy, x, groups):
    t = dy.shape[0] // groups * groups
    out = torch.bmm(dy[:t].view(groups, -1, dy.shape[1]).transpose(1, 2),
                    x[:t].view(groups, -1, x.shape[1])).sum(0)
    return out.addmm_(dy[t:].t(), x[t:]) if t < dy.shape[0] else out


def products() -> None:
    print("| T | dW | what | mm ms | TFLOP/s | split in 16 ms | 32 | 64 | 128 | "
          "max rel. difference (64) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t, rows, cols, what in PRODUCTS:
        dy, x = torch.randn(t, rows, device="cuda"), torch.randn(t, cols, device="cuda")
        flop = 2 * t * rows * cols / 1e9
        by_mm = median_ms(lambda: dy.t() @ x)
        splits = [median_ms(lambda g=g: split_product(dy, x, g)) for g in (16, 32, 64, 128)]
        exact = dy.double().t() @ x.double()
        diff = ((split_product(dy, x, 64).double() - exact).abs().max() / exact.abs().max()).item()
        print(f"| {t} | {rows} x {cols} | {what} | {by_mm:.3f} | {flop / by_mm:.1f} | "
              + " | ".join(f"{s:.3f}" for s in splits) + f" | {diff:.1e} |")


def lookups() -> None:
    from kernels.embedding_grad import embedding_grad, embedding_grad_ref

    print("\n| T | items | padding | what | PyTorch ms | Triton ms | max abs difference |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for t, items, padding, what in LOOKUPS:
        popularity = 1.0 / torch.arange(1, items, device="cuda", dtype=torch.float)  # Zipf
        idx = 1 + torch.multinomial(popularity, t, replacement=True, generator=g)
        idx[torch.rand(t, device="cuda", generator=g) < padding] = 0
        grad = torch.randn(t, 64, device="cuda", generator=g)
        ref = median_ms(lambda: embedding_grad_ref(idx, grad, items, 0))
        new = median_ms(lambda: embedding_grad(idx, grad, items, 0))
        diff = (embedding_grad(idx, grad, items, 0)
                - embedding_grad_ref(idx.cpu(), grad.double().cpu(), items, 0).cuda()).abs().max()
        print(f"| {t} | {items} | {padding} | {what} | {ref:.3f} | {new:.3f} | {diff.item():.1e} |")


def gated_norms() -> None:
    from kernels.gated_norm import gated_rms_norm, gated_rms_norm_bwd
    from ssd import triton_modules

    norm = triton_modules()[1]
    print("\n| T x E | what | mamba-ssm fwd ms | bwd ms | kernels.gated_norm fwd ms | bwd ms | "
          "fwd GB/s | bwd GB/s | max abs difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, width, what in NORMS:
        y, z, dout = (torch.randn(t, width, device="cuda") for _ in range(3))
        weight, dz = torch.randn(width, device="cuda"), torch.empty_like(z)
        options = {"z": z, "norm_before_gate": False, "is_rms_norm": True}
        _, _, rstd = norm._layer_norm_fwd(y, weight, None, 1e-12, **options)
        theirs = (median_ms(lambda: norm._layer_norm_fwd(y, weight, None, 1e-12, **options)),
                  median_ms(lambda: norm._layer_norm_bwd(dout, y, weight, None, 1e-12, None, rstd,
                                                         recompute_output=True, dz=dz, **options)))
        out, rstd = gated_rms_norm(y, z, weight, 1e-12)
        ours = (median_ms(lambda: gated_rms_norm(y, z, weight, 1e-12)),
                median_ms(lambda: gated_rms_norm_bwd(dout, y, z, weight, rstd, dz)))
        gb = t * width * 4 / 1e9  # one [T E] float32 tensor: forward moves 3, backward 6
        diff = (out - norm._layer_norm_fwd(y, weight, None, 1e-12, **options)[0]).abs().max()
        print(f"| {t} x {width} | {what} | {theirs[0]:.3f} | {theirs[1]:.3f} | {ours[0]:.3f} | "
              f"{ours[1]:.3f} | {3 * gb / ours[0] * 1e3:.0f} | {6 * gb / ours[1] * 1e3:.0f} | "
              f"{diff.item():.1e} |")


if __name__ == "__main__":
    products()
    lookups()
    gated_norms()
