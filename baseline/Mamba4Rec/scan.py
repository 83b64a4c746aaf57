"""Mamba-1's selective scan in PyTorch, for any device, in the memory of a few [B E N] states.

The function of :func:`kernels.selective_scan_ref.selective_scan_ref` (the recurrence, dt_proj's
bias and the softplus inside):

    delta_t = softplus(dt_t + dt_bias)                                       [B L E]
    h_t = exp(delta_t A) * h_{t-1} + (delta_t x_t) B_t,     h_{-1} = 0          [B E N]
    y_t = h_t C_t + D x_t                                                     [B L E]

as one autograd node, :func:`selective_scan_chunked`:

- forward runs the recurrence step by step, keeping only the running state, and keeps nothing but
  its inputs for backward;
- backward takes the batch in blocks of rows. For each, it runs the recurrence again, keeping the
  state at the end of every chunk of ceil(sqrt(L)) steps, then takes the chunks in reverse: it
  computes a chunk's states again from the kept one (the same operations, so the same values) and
  runs the states' gradient ``g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1}`` back through them.

Beyond its inputs and gradients, it holds a few [rows E N] tensors per step and about
2 sqrt(L) of them in backward, for a block of :data:`BLOCK_ELEMENTS` states: a bounded amount
whatever the batch. The tests hold it to the reference in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels import compute_dtype

BLOCK_ELEMENTS = 1 << 20  # states per block of rows (4 MiB in float32)


def chunk_length(length: int) -> int:
    """Steps per chunk, ceil(sqrt(L)): as many kept states as states of one chunk."""
    return math.isqrt(length - 1) + 1 if length > 1 else 1


def _row_blocks(batch: int, channels: int, n_states: int):
    """Slices of the batch, each of about :data:`BLOCK_ELEMENTS` states."""
    rows = max(1, BLOCK_ELEMENTS // (channels * n_states))
    return [slice(start, min(batch, start + rows)) for start in range(0, batch, rows)]


def _forward_rows(delta, x, A, B, C, y, states, chunk: int) -> None:
    """The recurrence over one block of rows: writes y (without D x), or with ``y`` None the
    states at the end of each chunk but the last (``states`` [R n_chunks-1 E N])."""
    rows, length, channels = x.shape
    h = x.new_zeros(rows, channels, A.shape[1])  # [R E N]
    decay = torch.empty_like(h)
    inputs = delta * x  # [R L E]
    for t in range(length):
        torch.mul(delta[:, t, :, None], A, out=decay).exp_()
        h.mul_(decay).addcmul_(inputs[:, t, :, None], B[:, t, None, :])
        if y is not None:
            y[:, t] = torch.bmm(h, C[:, t, :, None]).squeeze(-1)
        elif (t + 1) % chunk == 0 and t + 1 < length:
            states[:, (t + 1) // chunk - 1] = h


def _chunk_states(h, delta, inputs, A, B, steps: range):
    """``(states, decays)`` of the steps of one chunk from the state before it, h [R E N]:
    states[i] is the state before step ``steps[i]``, states[-1] the one after the last."""
    states, decays = [h], []
    for t in steps:
        decay = torch.exp(delta[:, t, :, None] * A)
        h = torch.addcmul(h * decay, inputs[:, t, :, None], B[:, t, None, :])
        states.append(h)
        decays.append(decay)
    return states, decays


def _backward_rows(delta, x, A, B, C, dy, grads) -> torch.Tensor:
    """Gradients of one block of rows: writes x's (without D's part), delta's, B's and C's into
    ``grads`` (views of the block's rows) and returns A's, summed over the block."""
    dx, ddelta, dB, dC = grads
    rows, length, channels = x.shape
    chunk = chunk_length(length)
    states = x.new_empty(rows, -(-length // chunk) - 1, channels, A.shape[1])
    _forward_rows(delta, x, A, B, C, None, states, chunk)
    inputs = delta * x  # [R L E]
    carry = x.new_zeros(rows, channels, A.shape[1])  # exp(delta_{t+1} A) g_{t+1}   [R E N]
    dA = torch.zeros_like(carry)  # summed over the block's rows at the end
    for index in reversed(range(-(-length // chunk))):
        steps = range(index * chunk, min(length, (index + 1) * chunk))
        start = states[:, index - 1] if index else torch.zeros_like(carry)  # read only
        hs, decays = _chunk_states(start, delta, inputs, A, B, steps)
        for i in reversed(range(len(steps))):
            t = steps[i]
            g = carry.addcmul_(dy[:, t, :, None], C[:, t, None, :])  # in place: carry is g_t
            dC[:, t] = torch.bmm(dy[:, t, None, :], hs[i + 1]).squeeze(1)
            dB[:, t] = torch.bmm(inputs[:, t, None, :], g).squeeze(1)
            g_b = torch.bmm(g, B[:, t, :, None]).squeeze(-1)  # [R E]
            decayed = (g * hs[i]).mul_(decays[i])  # the decay's gradient times the decay
            dA.addcmul_(decayed, delta[:, t, :, None])
            ddelta[:, t] = x[:, t] * g_b + decayed.mul_(A).sum(-1)
            dx[:, t] = delta[:, t] * g_b
            carry = g.mul_(decays[i])
    return dA.sum(0)


def _forward(x, dt, A, B, C, D, dt_bias):
    """y [B L E]."""
    delta = F.softplus(dt + dt_bias)  # [B L E]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    for rows in _row_blocks(x.shape[0], x.shape[2], A.shape[1]):
        _forward_rows(delta[rows], x[rows], A, B[rows], C[rows], y[rows], None, 1)
    return y.addcmul_(x, D)


def _backward(x, dt, A, B, C, D, dt_bias, dy):
    """The gradients of the seven inputs of :func:`_forward`, given y's."""
    pre = dt + dt_bias
    delta = F.softplus(pre)
    dx, ddelta = torch.empty_like(x), torch.empty_like(x)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dA = torch.zeros_like(A)
    for rows in _row_blocks(x.shape[0], x.shape[2], A.shape[1]):
        grads = (dx[rows], ddelta[rows], dB[rows], dC[rows])
        dA += _backward_rows(delta[rows], x[rows], A, B[rows], C[rows], dy[rows], grads)
    ddt = ddelta.mul_(torch.where(pre > 20, 1.0, torch.sigmoid(pre)))  # softplus's threshold
    return dx.addcmul_(dy, D), ddt, dA, dB, dC, (dy * x).sum((0, 1)), ddt.sum((0, 1))


class _ChunkedSelectiveScan(torch.autograd.Function):
    """In float32 at least, without autocast (bfloat16 states would lose the recurrence); y and
    the gradients in their tensors' dtypes."""

    @staticmethod
    def forward(ctx, *inputs):
        x = inputs[0]
        with torch.autocast(x.device.type, enabled=False):
            y = _forward(*(t.to(compute_dtype(x.dtype)) for t in inputs))
        ctx.save_for_backward(*inputs)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        inputs = ctx.saved_tensors
        dtype = compute_dtype(inputs[0].dtype)
        with torch.autocast(dy.device.type, enabled=False):
            grads = _backward(*(t.to(dtype) for t in inputs), dy.to(dtype))
        return tuple(grad.to(t.dtype) for grad, t in zip(grads, inputs))


def selective_scan_chunked(x, dt, A, B, C, D, dt_bias):
    """y [B L E] of the selective scan (module docstring), differentiable in every input."""
    return _ChunkedSelectiveScan.apply(x, dt, A, B, C, D, dt_bias)
