"""Autocast for the hand-written autograd nodes (:class:`ssd_ops.fused_block.FusedSSDBlock`, the
FFN's node in :mod:`tim4rec`) and the parts that compute in their operands' dtypes under it.

Under bfloat16 autocast, the nodes run with autocast off and cast their operands themselves: the
matrix products in autocast's dtype, the rest in the dtypes each part documents.
"""

from __future__ import annotations

import functools

import torch


def product_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of the matrix products that take ``t`` here: autocast's where autocast is on for
    t's device (bfloat16 with ``enable_amp``), else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def without_autocast(fn):
    """``fn`` run with autocast off on the device of its first tensor argument: it computes in
    the dtypes of its operands (those it casts them to), whatever the products around it run in."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return run


def amp_forward(forward):
    """An autograd Function's forward, in place of ``torch.amp.custom_fwd`` (which serves one device
    type), on any device: its first input fixes the device; ``ctx.dtype`` is the dtype of its
    matrix products there (:func:`product_dtype`), and it runs with autocast off, casting its
    operands to that dtype itself. Backward, decorated with :func:`amp_backward`, runs so too.
    The CPU tests under CPU autocast then see the casts a GPU makes under CUDA autocast."""

    @functools.wraps(forward)
    def run(ctx, first, *args):
        ctx.device_type, ctx.dtype = first.device.type, product_dtype(first)
        with torch.autocast(ctx.device_type, enabled=False):
            return forward(ctx, first, *args)

    return run


def amp_backward(backward):
    """An autograd Function's backward, with autocast off as in its :func:`amp_forward`."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.autocast(ctx.device_type, enabled=False):
            return backward(ctx, *grads)

    return run


def cast(dtype: torch.dtype, *tensors) -> tuple:
    """Each of ``tensors`` (None stays None) in ``dtype``."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)
