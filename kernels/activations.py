"""The activations that the kernels apply, and their derivatives, as PyTorch computes them."""

import triton
import triton.language as tl

ACTIVATIONS = ("hardswish", "silu")  # the ACT constant of the kernels is the index here


@triton.jit
def act_fn(x, ACT: tl.constexpr):
    if ACT == 0:  # hardswish
        return x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    else:  # silu
        return x / (1.0 + tl.exp(-x))


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    if ACT == 0:  # PyTorch's hardswish_backward (since 2.7), boundaries included: 0 at -3, 1 at 3
        return tl.where(x <= -3.0, 0.0, tl.where(x < 3.0, x / 3.0 + 0.5, 1.0))
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
        return s * (1.0 + x * (1.0 - s))
