"""This project's Triton kernels (:mod:`kernels`) against their PyTorch references: functions for
the CPU (float64, Triton's interpreter, run in a process of their own by tests/test_kernels.py)
and the GPU, each returning relative errors by name (and asserting what has no tolerance).

    TRITON_INTERPRET=1 python tests/kernel_checks.py        # prints the errors as JSON
    TRITON_INTERPRET=1 python tests/kernel_checks.py bf16   # bfloat16: [error, tolerance] each
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.numerics import rel_err  # noqa: E402  (after the path: this file runs as a script too)

# (batch, length, channels, kernel width, activation, row stride): odd sizes that leave partial
# blocks of steps and channels, sequences shorter than the kernel, rows read from a wider tensor,
# the time branch's 4 channels in one long block of steps.
SHAPES = [(3, 37, 70, 4, "hardswish", 90), (2, 5, 8, 2, "silu", 9), (2, 70, 130, 4, "silu", 140),
          (1, 3, 5, 4, "hardswish", 9), (4, 200, 192, 4, "hardswish", 324),
          (3, 200, 4, 4, "hardswish", 6)]


def conv_errors(device: str, dtype: torch.dtype) -> dict:
    """The causal convolution: output and the three gradients of each shape."""
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd, causal_conv_act_fn
    from kernels.causal_conv_ref import causal_conv_act_ref

    errors = {}
    for batch, length, channels, width, activation, stride in SHAPES:
        g = torch.Generator().manual_seed(length)

        def rand(*shape, scale=1.0, g=g):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

        wide = rand(batch, length, stride, scale=3.0)  # spans both hardswish corners
        x = wide[..., 1:channels + 1]  # rows of stride `stride`, as in in_proj's output
        weight, bias, dout = rand(channels, 1, width), rand(channels), rand(batch, length, channels)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        ref = causal_conv_act_ref(*leaves, activation)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        dx_into = torch.zeros(batch, length, stride, device=device, dtype=dtype)
        dx, dweight, dbias = causal_conv_act_bwd(x, weight, bias, dout, activation,
                                                 dx=dx_into[..., 1:channels + 1])
        name = f"{batch}x{length}x{channels} K{width} {activation}"
        errors[f"{name} out"] = rel_err(causal_conv_act(x, weight, bias, activation), ref)
        errors[f"{name} dx"] = rel_err(dx, ref_grads[0])
        errors[f"{name} dweight"] = rel_err(dweight, ref_grads[1])
        errors[f"{name} dbias"] = rel_err(dbias, ref_grads[2])
        in_place = causal_conv_act_bwd(x, weight, bias, dout.clone(), activation,
                                       overwrite_dout=True)
        for label, grad, ref_grad in zip(("dx", "dweight", "dbias"), in_place, ref_grads):
            errors[f"{name} {label}, over dout"] = rel_err(grad, ref_grad)
        through_autograd = torch.autograd.grad(
            causal_conv_act_fn(*leaves, activation), leaves, dout)
        for label, grad, ref_grad in zip(("dx", "dweight", "dbias"), through_autograd, ref_grads):
            errors[f"{name} {label}, autograd"] = rel_err(grad, ref_grad)
        # dx went into the given slice, and nowhere else
        errors[f"{name} dx outside"] = (dx_into[..., 0].abs().sum()
                                        + dx_into[..., channels + 1:].abs().sum()).item()
        # sequences laid end to end in each row (seq_idx): sorted, some one step long
        seq_idx = torch.randint(0, max(2, length // 3), (batch, length), generator=g)
        seq_idx = seq_idx.sort(dim=1).values.to(device=device, dtype=torch.int32)
        ref = causal_conv_act_ref(*leaves, activation, seq_idx)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        errors[f"{name} seq_idx out"] = rel_err(
            causal_conv_act(x, weight, bias, activation, seq_idx), ref)
        grads = causal_conv_act_bwd(x, weight, bias, dout, activation, seq_idx=seq_idx)
        for label, grad, ref_grad in zip(("dx", "dweight", "dbias"), grads, ref_grads):
            errors[f"{name} seq_idx {label}"] = rel_err(grad, ref_grad)
    return errors


def fused_block_errors(device: str, dtype: torch.dtype) -> dict:
    """FusedSSDBlock with the PyTorch scan and the Triton convolution (in the node and in the time
    branch) and gated RMSNorm, against the module path: output and every gradient."""
    import ssd
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd, causal_conv_act_fn
    from kernels.gated_norm import gated_rms_norm, gated_rms_norm_bwd
    from ssd_ops.block_kernels import torch_block_kernels
    from tests.test_ssd import block_outputs_and_grads

    def norm_bwd(dout, y, z, weight, eps, rstd, dz):
        return gated_rms_norm_bwd(dout, y, z, weight, rstd, dz)

    kernels = torch_block_kernels()._replace(
        conv_fwd=causal_conv_act, conv_bwd=causal_conv_act_bwd, conv=causal_conv_act_fn,
        norm_fwd=gated_rms_norm, norm_bwd=norm_bwd)
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=4,
                             backend="torch").to(device, dtype).eval()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.1)
    u = torch.randn(3, 12, 16, device=device, dtype=dtype, requires_grad=True)
    tau = torch.randn(3, block.nheads, 12, device=device, dtype=dtype, requires_grad=True)
    results = [block_outputs_and_grads(block, u, tau, run) for run in (
        block, lambda u, tau: block.forward_fused(u, tau, kernels))]
    (plain_out, plain), (fused_out, fused) = results
    assert plain.keys() == fused.keys()
    return {"block out": rel_err(fused_out, plain_out),
            **{f"block grad {name}": rel_err(fused[name], plain[name]) for name in plain}}


# (leading shape, width, residual, dropout p, eps): partial blocks of rows, widths that are not a
# power of two, no dropout (the residual's gradient is x's), everything dropped.
ADD_NORM_CASES = [((3, 37), 64, True, 0.25, 1e-12), ((5,), 70, False, 0.25, 1e-5),
                  ((2, 9), 256, True, 0.0, 1e-5), ((4, 3), 130, True, 0.5, 1e-5),
                  ((2, 5), 64, True, 1.0, 1e-5), ((1, 3), 1030, False, 0.25, 1e-5)]


def add_norm_errors(device: str, dtype: torch.dtype) -> dict:
    """Dropout, residual and LayerNorm: output and the four gradients of each case against the
    reference with the mask of the call's seed (the same generator state drawn again); without
    gradients, the same output. Asserts that masks drop about p and that two seeds differ."""
    from kernels.add_norm import dropout_add_norm, dropout_add_norm_ref
    from kernels.dropout import draw_seed, dropout_mask

    errors = {}
    for lead, width, with_residual, p, eps in ADD_NORM_CASES:
        g = torch.Generator().manual_seed(width)

        def rand(*shape, g=g):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

        x, weight, bias, dy = rand(*lead, width), rand(width), rand(width), rand(*lead, width)
        residual = rand(*lead, width) if with_residual else None
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias) if t is not None]
        res_leaf = leaves[1] if with_residual else None
        w_leaf, b_leaf = leaves[-2], leaves[-1]
        torch.manual_seed(1)
        out = dropout_add_norm(leaves[0], res_leaf, w_leaf, b_leaf, eps, p)
        grads = torch.autograd.grad(out, leaves, dy)
        torch.manual_seed(1)
        keep = dropout_mask(draw_seed(device), x.shape, p)
        ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        ref = dropout_add_norm_ref(ref_leaves[0], ref_leaves[1] if with_residual else None,
                                   ref_leaves[-2], ref_leaves[-1], eps, p, keep)
        ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
        name = f"{'x'.join(map(str, lead))}x{width} p{p}{' residual' if with_residual else ''}"
        errors[f"{name} out"] = rel_err(out, ref)
        for label, grad, ref_grad in zip(("dx", "dresidual", "dweight", "dbias")
                                         if with_residual else ("dx", "dweight", "dbias"),
                                         grads, ref_grads, strict=True):
            errors[f"{name} {label}"] = rel_err(grad, ref_grad)
        torch.manual_seed(1)
        with torch.no_grad():
            errors[f"{name} out, no grad"] = rel_err(
                dropout_add_norm(x, residual, weight, bias, eps, p), ref)
    return errors


# (shape, dropout p, activation): partial blocks, no dropout, everything dropped.
ACT_DROPOUT_CASES = [((3, 37, 256), 0.25, "hardswish"), ((5, 70), 0.0, "hardswish"),
                     ((2, 9, 130), 0.5, "silu"), ((4, 3), 1.0, "hardswish")]


def act_dropout_errors(device: str, dtype: torch.dtype) -> dict:
    """Activation and dropout: output, the input's gradient and the output computed again in
    backward, against the reference with the mask of the seed."""
    from kernels.act_dropout import act_dropout, act_dropout_bwd, act_dropout_ref
    from kernels.dropout import draw_seed, dropout_mask

    errors = {}
    for shape, p, activation in ACT_DROPOUT_CASES:
        g = torch.Generator().manual_seed(shape[-1])
        pre = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(device, dtype)
        dout = torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)
        seed = draw_seed(device) if p > 0 else None
        keep = dropout_mask(seed, shape, p) if p > 0 else None
        leaf = pre.clone().requires_grad_()
        ref = act_dropout_ref(leaf, p, keep, activation)
        (ref_grad,) = torch.autograd.grad(ref, leaf, dout)
        dpre, again = act_dropout_bwd(dout, pre, p, seed, activation, recompute_output=True)
        name = f"{'x'.join(map(str, shape))} p{p} {activation}"
        errors[f"{name} out"] = rel_err(act_dropout(pre, p, seed, activation), ref)
        errors[f"{name} dpre"] = rel_err(dpre, ref_grad)
        errors[f"{name} out again"] = rel_err(again, ref)
    return errors


def ffn_errors(device: str, dtype: torch.dtype) -> dict:
    """The FFN's inner part through the Triton kernels (keeping fc1's output, or recomputing it),
    against the plain modules with the kernel's mask: output and every gradient."""
    from kernels.act_dropout import act_dropout_ref
    from kernels.dropout import draw_seed, dropout_mask
    from tim4rec import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(8, 0.25).to(device, dtype).train()
    for p in ffn.parameters():
        p.data.normal_()
    h = torch.randn(3, 5, 8, device=device, dtype=dtype, requires_grad=True)
    leaves = [h, *ffn.parameters()]
    errors = {}
    for recompute in (False, True):
        torch.manual_seed(1)
        out = ffn.inner(h, recompute, fused=True)
        grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
        torch.manual_seed(1)
        keep = dropout_mask(draw_seed(device), (3, 5, 32), 0.25)
        ref = ffn.fc2(act_dropout_ref(ffn.fc1(h), 0.25, keep))
        ref_grads = torch.autograd.grad(ref.square().sum(), leaves, allow_unused=True)
        name = f"ffn{', recompute' if recompute else ''}"
        errors[f"{name} out"] = rel_err(out, ref)
        for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=True)):
            if ref_grad is not None:  # the LayerNorm's, outside the inner part
                errors[f"{name} grad {i}"] = rel_err(grad, ref_grad)
    return errors


# (rows, width, eps): partial blocks of rows, widths that are not a power of two, 64d's and
# 256d's inner widths.
GATED_NORM_CASES = [(37, 128, 1e-12), (5, 70, 1e-5), (9, 512, 1e-5), (3, 1030, 1e-5)]


def gated_norm_errors(device: str, dtype: torch.dtype) -> dict:
    """The gated RMSNorm: output, the three gradients and the output computed again in backward,
    against the reference differentiated by autograd."""
    from kernels.gated_norm import gated_rms_norm, gated_rms_norm_bwd
    from kernels.gated_norm_ref import gated_rmsnorm_ref

    errors = {}
    for rows, width, eps in GATED_NORM_CASES:
        g = torch.Generator().manual_seed(width)
        y, z, dout = (torch.randn(rows, width, generator=g, dtype=torch.float64).to(device, dtype)
                      for _ in range(3))
        weight = torch.randn(width, generator=g, dtype=torch.float64).to(device, dtype)
        leaves = [t.clone().requires_grad_() for t in (y, z, weight)]
        ref = gated_rmsnorm_ref(*leaves, eps)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        out, rstd = gated_rms_norm(y, z, weight, eps)
        dz = torch.empty_like(z)
        dy, dweight, again = gated_rms_norm_bwd(dout, y, z, weight, rstd, dz)
        name = f"gated norm {rows}x{width}"
        errors[f"{name} out"] = rel_err(out, ref)
        for label, grad, ref_grad in zip(("dy", "dz", "dweight"), (dy, dz, dweight), ref_grads,
                                         strict=True):
            errors[f"{name} {label}"] = rel_err(grad, ref_grad)
        errors[f"{name} out again"] = rel_err(again, ref)
    return errors


# (positions, table rows, width, padding_idx): partial blocks, a width of one block and a
# narrower one, no padding, every position one row (all additions to one address).
EMBEDDING_CASES = [((3, 37), 11, 64, 0), ((2, 9), 5, 130, None), ((4, 50), 7, 8, 3),
                   ((5, 6), 1, 64, None)]


def embedding_grad_errors(device: str, dtype: torch.dtype) -> dict:
    """The embedding table's gradient by atomic additions, against PyTorch's; zero at padding."""
    from kernels.embedding_grad import embedding_grad, embedding_grad_ref

    errors = {}
    for lead, rows, width, padding_idx in EMBEDDING_CASES:
        g = torch.Generator().manual_seed(width)
        indices = torch.randint(rows, lead, generator=g).to(device)
        grad = torch.randn(*lead, width, generator=g, dtype=torch.float64).to(device, dtype)
        out = embedding_grad(indices, grad, rows, padding_idx)
        assert out.shape == (rows, width) and out.dtype == dtype
        if padding_idx is not None:
            assert not out[padding_idx].any(), "the padding row's gradient must stay zero"
        name = f"embedding {'x'.join(map(str, lead))} -> {rows}x{width} padding {padding_idx}"
        errors[name] = rel_err(out, embedding_grad_ref(indices, grad, rows, padding_idx))
    return errors


def dropout_mask_checks(device: str) -> None:
    """A mask drops about p of its elements, and two seeds give two masks."""
    from kernels.dropout import draw_seed, dropout_mask

    keep = dropout_mask(draw_seed(device), (256, 64), 0.25)
    assert abs((~keep).double().mean().item() - 0.25) < 0.02, "a mask should drop about p"
    assert not torch.equal(keep, dropout_mask(draw_seed(device), (256, 64), 0.25)), "one mask twice"


def all_errors(device: str, dtype: torch.dtype) -> dict:
    dropout_mask_checks(device)
    return {**conv_errors(device, dtype), **fused_block_errors(device, dtype),
            **add_norm_errors(device, dtype), **act_dropout_errors(device, dtype),
            **ffn_errors(device, dtype), **gated_norm_errors(device, dtype),
            **embedding_grad_errors(device, dtype)}


# ------------------------------------------------------------------------- bfloat16 activations

BF16 = torch.bfloat16
# Tolerances of the bfloat16 checks (relative errors in the Frobenius norm). bfloat16 keeps 8
# significant bits: a rounding moves a value by at most one unit in the last place, 2^-7 of it
# (half of that where it rounds to nearest, as a GPU does; Triton's interpreter truncates).
ONCE = 2.0**-7  # a bfloat16 result of a float32 computation: rounded once
TWICE = 2.0**-6  # one that also went through a bfloat16 intermediate
FLOAT32 = 1e-5  # a float32 result of a float32 computation from bfloat16 inputs
REORDERED = 2.0**-5  # two paths through roundings of their own (gradients, sums of many)


def _bf16_leaf(*shape, device, g, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, BF16)


def _checked(errors: dict, name: str, value, reference, dtype, tolerance: float) -> None:
    """``errors[name] = [error, tolerance]``; ``value`` must be of ``dtype`` (asserted)."""
    assert value.dtype == dtype, f"{name}: {value.dtype}, not {dtype}"
    errors[name] = [rel_err(value.double(), reference.double()), tolerance]


def bf16_kernel_errors(device: str) -> dict:
    """Each kernel with bfloat16 activations and float32 weights, as under autocast, against the
    float64 reference of the same (bfloat16-valued) inputs: every output in its documented dtype
    (asserted), ``{name: [error, tolerance]}``."""
    from kernels.act_dropout import act_dropout, act_dropout_bwd, act_dropout_ref
    from kernels.add_norm import dropout_add_norm, dropout_add_norm_ref
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd
    from kernels.causal_conv_ref import causal_conv_act_ref
    from kernels.dropout import draw_seed, dropout_mask
    from kernels.embedding_grad import embedding_grad, embedding_grad_ref
    from kernels.gated_norm import gated_rms_norm, gated_rms_norm_bwd
    from kernels.gated_norm_ref import gated_rmsnorm_ref

    f32, errors = torch.float32, {}
    g = torch.Generator().manual_seed(0)

    # Dropout + residual + LayerNorm: a bfloat16 x, a float32 residual stream and norm (no dropout:
    # the residual's gradient is x's, in its own dtype).
    for lead, width, with_residual, p in [((3, 37), 64, True, 0.25), ((5,), 70, False, 0.25),
                                          ((2, 9), 64, True, 0.0)]:
        x = _bf16_leaf(*lead, width, device=device, g=g).requires_grad_()
        others = [torch.randn(*shape, generator=g, dtype=torch.float64).to(device, f32)
                  for shape in ((*lead, width), (width,), (width,), (*lead, width))]
        residual, weight, bias, dy = others
        leaves = [x, residual, weight, bias] if with_residual else [x, weight, bias]
        for t in leaves[1:]:
            t.requires_grad_()
        torch.manual_seed(1)
        out = dropout_add_norm(x, residual if with_residual else None, weight, bias, 1e-5, p)
        grads = torch.autograd.grad(out, leaves, dy)
        torch.manual_seed(1)
        keep = dropout_mask(draw_seed(device), x.shape, p) if p > 0 else None
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = dropout_add_norm_ref(ref_leaves[0], ref_leaves[1] if with_residual else None,
                                   ref_leaves[-2], ref_leaves[-1], 1e-5, p, keep)
        ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
        name = f"add_norm {'x'.join(map(str, lead))}x{width} p{p}"
        _checked(errors, f"{name} out", out, ref, f32, FLOAT32)
        labels = ("dx", "dresidual", "dweight", "dbias") if with_residual else (
            "dx", "dweight", "dbias")
        for label, grad, ref_grad, leaf in zip(labels, grads, ref_grads, leaves, strict=True):
            _checked(errors, f"{name} {label}", grad, ref_grad, leaf.dtype,
                     ONCE if leaf.dtype == BF16 else FLOAT32)

    # Hardswish + dropout on the FFN's bfloat16 hidden layer.
    for p in (0.25, 0.0):
        pre, dout = (_bf16_leaf(4, 9, 130, device=device, g=g, scale=3.0) for _ in range(2))
        seed = draw_seed(device) if p > 0 else None
        keep = dropout_mask(seed, pre.shape, p) if p > 0 else None
        leaf = pre.double().requires_grad_()
        ref = act_dropout_ref(leaf, p, keep)
        (ref_grad,) = torch.autograd.grad(ref, leaf, dout.double())
        dpre, again = act_dropout_bwd(dout, pre, p, seed, recompute_output=True)
        _checked(errors, f"act_dropout p{p} out", act_dropout(pre, p, seed), ref, BF16, ONCE)
        _checked(errors, f"act_dropout p{p} dpre", dpre, ref_grad, BF16, ONCE)
        _checked(errors, f"act_dropout p{p} out again", again, ref, BF16, ONCE)

    # The gated RMSNorm: bfloat16 y and z (the scan's output, in_proj's z), a float32 weight.
    for rows, width in [(37, 128), (9, 70)]:
        y, z, dout = (_bf16_leaf(rows, width, device=device, g=g) for _ in range(3))
        weight = torch.randn(width, generator=g, dtype=torch.float64).to(device, f32)
        leaves = [t.double().requires_grad_() for t in (y, z, weight)]
        ref = gated_rmsnorm_ref(*leaves, 1e-5)
        ref_grads = torch.autograd.grad(ref, leaves, dout.double())
        out, rstd = gated_rms_norm(y, z, weight, 1e-5)
        assert rstd.dtype == f32
        dz = torch.empty_like(z)
        dy, dweight, again = gated_rms_norm_bwd(dout, y, z, weight, rstd, dz)
        name = f"gated norm {rows}x{width}"
        _checked(errors, f"{name} out", out, ref, BF16, ONCE)
        _checked(errors, f"{name} out again", again, ref, BF16, ONCE)
        for label, grad, ref_grad, dtype in zip(("dy", "dz", "dweight"), (dy, dz, dweight),
                                                ref_grads, (BF16, BF16, f32), strict=True):
            _checked(errors, f"{name} {label}", grad, ref_grad, dtype,
                     ONCE if dtype == BF16 else FLOAT32)

    # The causal convolution on in_proj's bfloat16 output (rows of a wider tensor), float32
    # weights. Backward writes the pre-activation's gradient in bfloat16 first (over dout).
    for batch, length, channels, activation, stride in [(3, 37, 70, "hardswish", 90),
                                                        (2, 20, 4, "silu", 6)]:
        wide = _bf16_leaf(batch, length, stride, device=device, g=g, scale=3.0)
        x = wide[..., 1:channels + 1]
        weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64).to(device, f32)
                        for shape in ((channels, 1, 4), (channels,)))
        dout = _bf16_leaf(batch, length, channels, device=device, g=g)
        leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
        ref = causal_conv_act_ref(*leaves, activation)
        ref_grads = torch.autograd.grad(ref, leaves, dout.double())
        dx_into = torch.zeros(batch, length, stride, device=device, dtype=BF16)
        dx, dweight, dbias = causal_conv_act_bwd(x, weight, bias, dout, activation,
                                                 dx=dx_into[..., 1:channels + 1])
        name = f"conv {batch}x{length}x{channels} {activation}"
        _checked(errors, f"{name} out", causal_conv_act(x, weight, bias, activation), ref, BF16,
                 ONCE)
        _checked(errors, f"{name} dx", dx, ref_grads[0], BF16, TWICE)
        _checked(errors, f"{name} dweight", dweight, ref_grads[1], f32, TWICE)
        _checked(errors, f"{name} dbias", dbias, ref_grads[2], f32, TWICE)

    # The item embedding's gradient from a bfloat16 gradient: summed and kept in float32.
    indices = torch.randint(11, (3, 37), generator=g).to(device)
    grad = _bf16_leaf(3, 37, 64, device=device, g=g)
    _checked(errors, "embedding grad", embedding_grad(indices, grad, 11, 0, f32),
             embedding_grad_ref(indices, grad.double(), 11, 0), f32, FLOAT32)
    return errors


def bf16_model_errors(device: str) -> dict:
    """Under autocast (bfloat16), the fused SSD block (the Triton convolution and gated RMSNorm,
    the PyTorch scan) against the module path, and the FFN's inner part through the Triton
    kernels against the plain modules with the kernel's mask: outputs (bfloatf16) and every
    gradient (float32, asserted), ``{name: [error, tolerance]}``."""
    import ssd
    from kernels.act_dropout import act_dropout_ref
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd, causal_conv_act_fn
    from kernels.dropout import draw_seed, dropout_mask
    from kernels.gated_norm import gated_rms_norm, gated_rms_norm_bwd
    from ssd_ops.block_kernels import torch_block_kernels
    from tests.test_ssd import block_outputs_and_grads
    from tim4rec import FeedForward

    def norm_bwd(dout, y, z, weight, eps, rstd, dz):
        return gated_rms_norm_bwd(dout, y, z, weight, rstd, dz)

    def in_autocast(run):
        def ran(*args):
            with torch.autocast(device, dtype=BF16):
                return run(*args)
        return ran

    f32, errors = torch.float32, {}
    kernels = torch_block_kernels()._replace(
        conv_fwd=causal_conv_act, conv_bwd=causal_conv_act_bwd, conv=causal_conv_act_fn,
        norm_fwd=gated_rms_norm, norm_bwd=norm_bwd)
    for is_time, with_at in ((True, False), (False, True)):
        torch.manual_seed(0)
        block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=4,
                                 is_time=is_time, backend="torch").to(device).eval()
        for p in block.parameters():
            p.data.add_(torch.randn_like(p), alpha=0.1)
        u = torch.randn(3, 12, 16, device=device, requires_grad=True)
        tau = (torch.randn(3, block.nheads, 12, device=device, requires_grad=True) if is_time
               else None)
        at = torch.tensor([11, 0, 5], device=device) if with_at else None
        (plain_out, plain), (fused_out, fused) = (block_outputs_and_grads(
            block, u, tau, in_autocast(run)) for run in (
                lambda u, tau: block(u, tau, at),
                lambda u, tau: block.forward_fused(u, tau, kernels, at)))
        assert plain.keys() == fused.keys()
        name = f"block{' time' if is_time else ''}{' at' if with_at else ''}"
        _checked(errors, f"{name} out", fused_out, plain_out, BF16, ONCE)
        for key in plain:
            _checked(errors, f"{name} grad {key}", fused[key], plain[key], f32, REORDERED)

    torch.manual_seed(0)
    ffn = FeedForward(8, 0.25).to(device).train()
    for p in ffn.parameters():
        p.data.normal_()
    h = torch.randn(3, 5, 8, device=device, requires_grad=True)
    leaves = [h, ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight, ffn.fc2.bias]
    for recompute in (False, True):
        torch.manual_seed(1)
        out = in_autocast(ffn.inner)(h, recompute, True)
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        torch.manual_seed(1)
        keep = dropout_mask(draw_seed(device), (3, 5, 32), 0.25)
        ref = in_autocast(lambda h: ffn.fc2(act_dropout_ref(ffn.fc1(h), 0.25, keep)))(h)
        ref_grads = torch.autograd.grad(ref.float().square().sum(), leaves)
        name = f"ffn{', recompute' if recompute else ''}"
        _checked(errors, f"{name} out", out, ref, BF16, TWICE)  # the modules round Hardswish too
        for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=True)):
            _checked(errors, f"{name} grad {i}", grad, ref_grad, f32, REORDERED)
    return errors


def all_bf16_errors(device: str) -> dict:
    return {**bf16_kernel_errors(device), **bf16_model_errors(device)}


if __name__ == "__main__":
    if sys.argv[1:] == ["bf16"]:
        print(json.dumps(all_bf16_errors("cpu")))
    else:
        print(json.dumps(all_errors("cpu", torch.float64)))
