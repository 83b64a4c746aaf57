"""The step's float32 products in Triton (exact, and 3xTF32) against cuBLAS, on a GPU.

    python bench/triton_gemm.py

TiM4Rec's float32 products (the projections and the FFN, forward and backward) are cuBLAS's
float32 GEMMs, which run on the CUDA cores. Two alternatives that keep float32 accuracy were
measured here before deciding to keep cuBLAS:

- a Triton product with ``input_precision="ieee"`` (float32 on the CUDA cores, as cuBLAS);
- the same with ``"tf32x3"``: each float32 operand split into a TF32 high and low part, and three
  TF32 tensor-core products summed (the low x low term is dropped), as accurate as float32.

Weight gradients, whose reduction runs over every position of the batch, are split over the
positions (a grid axis) and the parts summed by PyTorch. For each shape of settings (b) and (c)
of bench/gpu_speed.py, the best of a few block shapes is printed, with the largest error relative
to the float64 product's largest entry, beside cuBLAS in float32 and in TF32 (which is not as
accurate: an opt-in of the project).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gpu_speed import median_cuda_ms  # the benchmark beside this one

median_ms = functools.partial(median_cuda_ms, warmup=1)  # after 1 untimed call

SHAPES = [  # (what, M, K, N, weight gradient: A is stored transposed, K runs over positions)
    ("b: in_proj", 409600, 64, 452, False), ("b: in_proj, dX", 409600, 452, 64, False),
    ("b: in_proj, dW", 452, 409600, 64, True), ("b: fc1", 409600, 64, 256, False),
    ("b: fc2", 409600, 256, 64, False), ("b: fc1, dW", 256, 409600, 64, True),
    ("c: in_proj", 102400, 256, 1104, False), ("c: fc1", 102400, 256, 1024, False),
    ("c: fc2", 102400, 1024, 256, False), ("c: fc1, dW", 1024, 102400, 256, True),
]
BLOCKS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 3), (64, 128, 32, 4, 4)]


@triton.jit
def _matmul_kernel(A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, k_per_part,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[part] = A[:, ks] @ B[ks, :] over this part's ks; output tiles in groups of GROUP_M rows
    of tiles, so that neighbouring programs share B's columns in cache."""
    pid, part = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    rows = min(tiles_m - group * GROUP_M, GROUP_M)
    tile_m = group * GROUP_M + (pid % (GROUP_M * tiles_n)) % rows
    tile_n = (pid % (GROUP_M * tiles_n)) // rows
    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for start in range(part * k_per_part, (part + 1) * k_per_part, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        a = tl.load(A + m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(B + k[:, None] * stride_bk + n[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(C + part * M * N + m[:, None] * N + n[None, :], acc,
             mask=(m[:, None] < M) & (n[None, :] < N))


def matmul(a, b, precision, block, parts=1):
    """a [M K] @ b [K N] in float32 (any strides), the reduction split in ``parts``."""
    (M, K), N = a.shape, b.shape[1]
    block_m, block_n, block_k, warps, stages = block
    k_per_part = triton.cdiv(triton.cdiv(K, parts), block_k) * block_k
    parts = triton.cdiv(K, k_per_part)
    c = torch.empty((parts, M, N), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), parts)
    _matmul_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         k_per_part, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)
    return c[0] if parts == 1 else c.sum(0)


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(0)
    print("| what | M x K x N | cuBLAS fp32 ms | error | cuBLAS TF32 ms | error |"
          " Triton ieee ms | error | Triton tf32x3 ms | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for what, M, K, N, weight_grad in SHAPES:
        if weight_grad:  # the activations, [positions, M], read transposed
            a = torch.randn(K, M, device="cuda", generator=generator).t()
        else:
            a = torch.randn(M, K, device="cuda", generator=generator)
        b = torch.randn(K, N, device="cuda", generator=generator)
        exact = a.double() @ b.double()

        def error(c):
            return f"{((c.double() - exact).abs().max() / exact.abs().max()).item():.1e}"

        cells = [f"{median_ms(lambda: a @ b):.3f}", error(a @ b)]
        torch.backends.cuda.matmul.allow_tf32 = True
        cells += [f"{median_ms(lambda: a @ b):.3f}", error(a @ b)]
        torch.backends.cuda.matmul.allow_tf32 = False
        for precision in ("ieee", "tf32x3"):
            timed = [(median_ms(lambda: matmul(a, b, precision, block, parts), calls=10), block,
                      parts)
                     for block in BLOCKS for parts in ((32, 64, 128) if weight_grad else (1,))]
            ms, block, parts = min(timed)
            cells += [f"{ms:.3f}", error(matmul(a, b, precision, block, parts))]
        print(f"| {what} | {M} x {K} x {N} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
