"""Mamba-1's selective scan over [B L E] rows (Triton, forward and backward), and its reference.

    delta_t = softplus(dt_t + dt_bias)                                       [B L E]
    h_t = exp(delta_t A) * h_{t-1} + (delta_t x_t) B_t,     h_{-1} = 0          [B E N]
    y_t = h_t C_t + D x_t                                                     [B L E]

with x, dt [B L E], A [E N], B, C [B L N] (shared by every channel), D, dt_bias [E]. dt_proj's
bias and the softplus are inside the scan, as in mamba-ssm's ``selective_scan_fn``: the step sizes
are never written to memory. The gate ``y * silu(z)`` stays outside.

The kernels never write a [B L E N] tensor:

- one program per (batch row, block of channels) holds the N states of its channels; the channels
  are the contiguous axis of x, dt, y and their gradients, and the fastest axis of the tiles, so
  each load and store is a run of contiguous elements;
- time goes in chunks of :data:`CHUNK` steps: a chunk's decays ``exp(delta A)`` and inputs
  ``delta x B`` are [CHUNK N channels] tiles in registers, and the recurrence over the chunk is an
  associative scan of the pairs (decay, input) along its steps, from a zero state, to which the
  state the previous chunk left is added times the running product of the decays;
- :func:`selective_scan_fwd` writes y and the state at the end of every chunk but the last,
  [B n_chunks-1 N E]: the only states that leave registers, and all that forward keeps besides
  its inputs;
- :func:`selective_scan_bwd` walks the chunks in reverse. For each it computes the chunk's states
  again from the kept one (the same scan: the same values), and the states' gradient
  ``g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1}`` by a scan over the chunk's steps in reverse
  order, from the gradient that the chunk after it left. It writes dx and d(dt) per step; the
  gradients of B and C (sums over channels) per block of channels, and those of A, D and dt_bias
  (sums over steps) per batch row, which PyTorch adds up: no atomics, the same result every run.
  The decays' gradient needs ``exp(delta_t A) h_{t-1}``, which is ``h_t - delta_t x_t B_t``.

:func:`selective_scan_fn` is the pair for autograd. The reference, PyTorch one step after the other
and differentiated by autograd, is :mod:`kernels.selective_scan_ref`. The tests hold the kernels
to it in float64 (Triton's interpreter, on the CPU) and in float32 on a GPU.

NOTE:
    1. The softplus is ``log(1 + e^v)`` with Goldberg's correction for the rounding of ``1 + e^v``
       (libdevice's log1p is missing from Triton's interpreter), and ``v`` above 20, as
       ``F.softplus``; its derivative is 1 there, as in PyTorch.
    2. A chunk's state passes to the next chunk through the states it is written to (and the
       states' gradient through a [B 2 N E] buffer), not in registers: a value carried around the
       loop into the scan makes Triton compute the whole chunk twice, in two layouts.
    3. The reverse-order scan loads the rows reversed, scans forward and flips the result:
       Triton's ``reverse=True`` scan costs several times as many instructions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import accumulation_dtypes, check_offsets

CHUNK = 8  # steps per chunk: a power of two (the flip of a chunk's rows needs one)
TILE = 512  # states per program (N x channels): a chunk's tiles stay in registers
MAX_BLOCK_E, NUM_WARPS = 32, 4
MAX_STATE = 256  # the largest d_state (N): a channel's states are one program's


@triton.jit
def _recurrence(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2), as maps h -> a h + b: h -> a2 (a1 h + b1) + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(v):
    """log(1 + e^v), and v above 20 (F.softplus's threshold)."""
    z = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + z
    # log(u) * z / (u - 1) cancels the rounding of u; where u rounds to 1, log1p(z) is z.
    log1p = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, log1p)


@triton.jit
def _rows(row0, t, cols, L, n_cols, stride_l, DTYPE: tl.constexpr):
    """The [T C] tile of steps t and columns cols of one batch row (zero outside)."""
    inside = (t < L)[:, None] & (cols < n_cols)[None, :]
    return tl.load(row0 + t[:, None] * stride_l + cols[None, :], mask=inside, other=0.0).to(DTYPE)


@triton.jit
def _step_sizes(dt_row0, bias, t, e, L, E, stride_l, DTYPE: tl.constexpr):
    """(delta, v) of steps t [T] and channels e [BE]: v = dt + bias, delta = softplus(v), and
    delta = 0 past the sequence (decay 1, input 0: a state there stays as it was)."""
    v = _rows(dt_row0, t, e, L, E, stride_l, DTYPE) + bias[None, :]
    return tl.where((t < L)[:, None], _softplus(v), 0.0), v


@triton.jit
def _chunk_states(delta, x, Bt, A, h0):
    """The states of a chunk's steps [T N BE] from the state before it, h0 [N BE]; also the
    inputs delta_t x_t B_t [T N BE]."""
    decay = tl.exp(delta[:, None, :] * A[None, :, :])
    inputs = (delta * x)[:, None, :] * Bt[:, :, None]
    decays, h = tl.associative_scan((decay, inputs), 0, _recurrence)  # from a zero state
    return h + decays * h0[None, :, :], inputs


@triton.jit
def _program_channels(A, D, BIAS, E, N, DTYPE: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channels e [BE], states n [BN], steps of a chunk s [CHUNK], their masks,
    and the channels' A [BN BE], D and dt bias [BE]."""
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    n, s = tl.arange(0, BLOCK_N), tl.arange(0, CHUNK)
    emask, nmask = e < E, n < N
    ne_mask = nmask[:, None] & emask[None, :]
    A_ne = tl.load(A + e[None, :] * N + n[:, None], mask=ne_mask, other=0.0).to(DTYPE)  # [N BE]
    d = tl.load(D + e, mask=emask, other=0.0).to(DTYPE)
    bias = tl.load(BIAS + e, mask=emask, other=0.0).to(DTYPE)
    return e, n, s, emask, nmask, ne_mask, A_ne, d, bias


@triton.jit
def _selective_scan_fwd_kernel(X, DT, A, B, C, D, BIAS, Y, STATES, L, E, N,
                               stride_xb, stride_xl, stride_dtb, stride_dtl, stride_bb, stride_bl,
                               stride_cb, stride_cl, DTYPE: tl.constexpr, CHUNK: tl.constexpr,
                               N_CHUNKS: tl.constexpr, BLOCK_E: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    e, n, s, emask, nmask, ne_mask, A_ne, d, bias = _program_channels(
        A, D, BIAS, E, N, DTYPE, CHUNK, BLOCK_E, BLOCK_N)
    x_row0, dt_row0 = X + b * stride_xb, DT + b * stride_dtb
    b_row0, c_row0 = B + b * stride_bb, C + b * stride_cb
    states_row0 = STATES + b * (N_CHUNKS - 1) * N * E + n[:, None] * E + e[None, :]
    for chunk in range(N_CHUNKS):
        t = chunk * CHUNK + s
        delta, _ = _step_sizes(dt_row0, bias, t, e, L, E, stride_dtl, DTYPE)  # [T BE]
        x = _rows(x_row0, t, e, L, E, stride_xl, DTYPE)
        Bt = _rows(b_row0, t, n, L, N, stride_bl, DTYPE)  # [T N]
        Ct = _rows(c_row0, t, n, L, N, stride_cl, DTYPE)
        # The state passes from chunk to chunk through memory, not in registers: it is kept for
        # backward anyway, and a value carried around the loop into the scan makes the compiler
        # compute the whole chunk twice, in two layouts.
        h0 = tl.load(states_row0 + (chunk - 1) * N * E, mask=ne_mask & (chunk > 0), other=0.0)
        h, _ = _chunk_states(delta, x, Bt, A_ne, h0.to(DTYPE))
        y = tl.sum(h * Ct[:, :, None], axis=1) + d[None, :] * x
        tl.store(Y + (b * L + t[:, None]) * E + e[None, :], y.to(Y.dtype.element_ty),
                 mask=(t < L)[:, None] & emask[None, :])
        if chunk < N_CHUNKS - 1:
            h_last = tl.sum(tl.where((s == CHUNK - 1)[:, None, None], h, 0.0), axis=0)
            tl.store(states_row0 + chunk * N * E, h_last, mask=ne_mask)
            tl.debug_barrier()  # the next chunk's threads read what these wrote


@triton.jit
def _states_grad(dt_row0, dy_row0, c_row0, bias, A, g_next, chunk, s, e, n, L, E, N, stride_dtl,
                 stride_cl, DTYPE: tl.constexpr, CHUNK: tl.constexpr):
    """The states' gradient g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1} over a chunk's steps
    [T N BE], from g_next, the gradient at the next chunk's first step [N BE].

    The recurrence runs backward in time: its rows are taken in reverse order, scanned forward,
    then flipped (Triton's reverse scan costs far more than a forward scan and a flip)."""
    t_rev = chunk * CHUNK + CHUNK - 1 - s
    delta_next, _ = _step_sizes(dt_row0, bias, t_rev + 1, e, L, E, stride_dtl, DTYPE)
    decay_next = tl.exp(delta_next[:, None, :] * A[None, :, :])
    dy_rev = _rows(dy_row0, t_rev, e, L, E, E, DTYPE)
    c_rev = _rows(c_row0, t_rev, n, L, N, stride_cl, DTYPE)
    decays, g_rev = tl.associative_scan((decay_next, dy_rev[:, None, :] * c_rev[:, :, None]), 0,
                                        _recurrence)
    return tl.flip(g_rev + decays * g_next[None, :, :], 0)


@triton.jit
def _selective_scan_bwd_kernel(X, DT, A, B, C, D, BIAS, DY, STATES, CARRY, DX, DDT, DA, DB, DC, DD,
                               DBIAS, L, E, N, n_batch, stride_xb, stride_xl, stride_dtb,
                               stride_dtl, stride_bb, stride_bl, stride_cb, stride_cl,
                               DTYPE: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
                               BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    b, pid_e = tl.program_id(0), tl.program_id(1)
    e, n, s, emask, nmask, ne_mask, A_ne, d, bias = _program_channels(
        A, D, BIAS, E, N, DTYPE, CHUNK, BLOCK_E, BLOCK_N)
    x_row0, dt_row0, dy_row0 = X + b * stride_xb, DT + b * stride_dtb, DY + b * L * E
    b_row0, c_row0 = B + b * stride_bb, C + b * stride_cb
    states_row0 = STATES + b * (N_CHUNKS - 1) * N * E + n[:, None] * E + e[None, :]
    # g from chunk to chunk, in two slots taken in turn: a chunk writes one while slower threads
    # may still read the other (the barrier after each write orders the rest)
    carry = CARRY + b * 2 * N * E + n[:, None] * E + e[None, :]
    dA = tl.zeros((BLOCK_N, BLOCK_E), DTYPE)
    dD = tl.zeros((BLOCK_E,), DTYPE)
    dbias = tl.zeros((BLOCK_E,), DTYPE)
    for i in range(N_CHUNKS):
        chunk = N_CHUNKS - 1 - i
        t = chunk * CHUNK + s
        inside = (t < L)[:, None] & emask[None, :]
        delta, v = _step_sizes(dt_row0, bias, t, e, L, E, stride_dtl, DTYPE)  # [T BE]
        x = _rows(x_row0, t, e, L, E, stride_xl, DTYPE)
        dy = _rows(dy_row0, t, e, L, E, E, DTYPE)
        Bt = _rows(b_row0, t, n, L, N, stride_bl, DTYPE)  # [T N]
        h0 = tl.load(states_row0 + (chunk - 1) * N * E, mask=ne_mask & (chunk > 0), other=0.0)
        h, inputs = _chunk_states(delta, x, Bt, A_ne, h0.to(DTYPE))  # as the forward computed
        # rows of this block's partial sums over channels
        pairs = ((pid_e * n_batch + b) * L + t[:, None]) * N + n[None, :]
        pairs_mask = (t < L)[:, None] & nmask[None, :]
        tl.store(DC + pairs, tl.sum(dy[:, None, :] * h, axis=2), mask=pairs_mask)
        g_next = tl.load(carry + (i + 1) % 2 * N * E, mask=ne_mask & (i > 0), other=0.0)
        g = _states_grad(dt_row0, dy_row0, c_row0, bias, A_ne, g_next.to(DTYPE), chunk, s, e, n,
                         L, E, N, stride_dtl, stride_cl, DTYPE, CHUNK)
        if chunk > 0:  # through memory, as the forward's state
            tl.store(carry + i % 2 * N * E,
                     tl.sum(tl.where((s == 0)[:, None, None], g, 0.0), axis=0), mask=ne_mask)
            tl.debug_barrier()
        # the decays' gradient times the decays: g_t * exp(delta_t A) h_{t-1}
        g_decayed = g * (h - inputs)
        dA += tl.sum(delta[:, None, :] * g_decayed, axis=0)
        tl.store(DB + pairs, tl.sum(g * (delta * x)[:, None, :], axis=2), mask=pairs_mask)
        g_b = tl.sum(g * Bt[:, :, None], axis=1)  # [T BE]
        ddelta = x * g_b + tl.sum(g_decayed * A_ne[None, :, :], axis=1)
        ddt = tl.where(inside, ddelta * tl.where(v > 20.0, 1.0, tl.sigmoid(v)), 0.0)
        offsets = (b * L + t[:, None]) * E + e[None, :]
        tl.store(DX + offsets, (delta * g_b + d[None, :] * dy).to(DX.dtype.element_ty),
                 mask=inside)
        tl.store(DDT + offsets, ddt.to(DDT.dtype.element_ty), mask=inside)
        dbias += tl.sum(ddt, axis=0)
        dD += tl.sum(dy * x, axis=0)
    tl.store(DA + b * N * E + n[:, None] * E + e[None, :], dA, mask=ne_mask)
    tl.store(DD + b * E + e, dD, mask=emask)
    tl.store(DBIAS + b * E + e, dbias, mask=emask)


def _check(x, dt, A, B, C, D, dt_bias):
    """Shapes and layouts the kernels take; returns (batch, length, channels, states)."""
    if x.dim() != 3 or dt.shape != x.shape:
        raise ValueError(f"x and dt must be [B L E] of one shape, got {tuple(x.shape)} and "
                         f"{tuple(dt.shape)}")
    batch, length, channels = x.shape
    if A.dim() != 2 or A.shape[0] != channels or not 0 < A.shape[1] <= MAX_STATE:
        raise ValueError(f"A must be [E N] with E = {channels} and N <= {MAX_STATE}, got "
                         f"{tuple(A.shape)}")
    states = A.shape[1]
    if B.shape != (batch, length, states) or C.shape != B.shape:
        raise ValueError(f"B and C must be [B L N] = {(batch, length, states)}, got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    if D.shape != (channels,) or dt_bias.shape != (channels,):
        raise ValueError(f"D and dt_bias must be [E] = ({channels},)")
    if any(t.stride(-1) != 1 for t in (x, dt, B, C)):
        raise ValueError("x, dt, B and C must have a contiguous last axis")
    check_offsets("selective_scan", x, dt, B, C)
    return batch, length, channels, states


def _launch_args(x, A, chunk):
    """``(n_chunks, grid, constants)``: blocks of channels holding about :data:`TILE` states (16
    channels at N = 32), at least 4 channels so that a row's loads are not too short."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    batch, length, channels = x.shape
    n_chunks = triton.cdiv(length, chunk)
    block_n = triton.next_power_of_2(A.shape[1])
    block_e = min(triton.next_power_of_2(channels), MAX_BLOCK_E, max(4, TILE // block_n))
    constants = {"DTYPE": accumulation_dtypes(x.dtype)[0], "CHUNK": chunk, "N_CHUNKS": n_chunks,
                 "BLOCK_E": block_e, "BLOCK_N": block_n, "num_warps": NUM_WARPS}
    return n_chunks, (batch, triton.cdiv(channels, block_e)), constants


def _strides(x, dt, B, C):
    return (x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1),
            C.stride(0), C.stride(1))


def selective_scan_fwd(x, dt, A, B, C, D, dt_bias, chunk: int = CHUNK):
    """``(y, states)``: y [B L E] (x's dtype, contiguous) and the states at the end of each chunk
    of ``chunk`` steps but the last, [B n_chunks-1 N E] (float32, float64 for float64 x)."""
    batch, length, channels, n_states = _check(x, dt, A, B, C, D, dt_bias)
    n_chunks, grid, constants = _launch_args(x, A, chunk)
    acc_dtype = accumulation_dtypes(x.dtype)[1]
    y = torch.empty((batch, length, channels), device=x.device, dtype=x.dtype)
    states = torch.empty((batch, n_chunks - 1, n_states, channels), device=x.device,
                         dtype=acc_dtype)
    check_offsets("selective_scan", y, states)
    # a kernel takes no zero-size tensor: with one chunk it never writes the states
    states_arg = states if states.numel() else torch.empty(1, device=x.device, dtype=acc_dtype)
    _selective_scan_fwd_kernel[grid](x, dt, A.contiguous(), B, C, D.contiguous(),
                                     dt_bias.contiguous(), y, states_arg, length, channels,
                                     n_states, *_strides(x, dt, B, C), **constants)
    return y, states


def selective_scan_bwd(x, dt, A, B, C, D, dt_bias, states, dy, chunk: int = CHUNK):
    """The gradients ``(dx, ddt, dA, dB, dC, dD, ddt_bias)`` of :func:`selective_scan_fwd`'s y,
    given ``dy`` [B L E] and the states it returned (computed with the same ``chunk``)."""
    batch, length, channels, n_states = _check(x, dt, A, B, C, D, dt_bias)
    n_chunks, grid, constants = _launch_args(x, A, chunk)
    if states.shape != (batch, n_chunks - 1, n_states, channels):
        raise ValueError(f"states must be the forward's, [B {n_chunks - 1} N E] for chunks of "
                         f"{chunk}, got {tuple(states.shape)}")
    dy = dy.contiguous()
    acc_dtype = accumulation_dtypes(x.dtype)[1]
    dx = torch.empty((batch, length, channels), device=x.device, dtype=x.dtype)
    ddt = torch.empty((batch, length, channels), device=x.device, dtype=dt.dtype)
    partial = {"device": x.device, "dtype": acc_dtype}
    dA = torch.empty((batch, n_states, channels), **partial)  # per batch row
    dB = torch.empty((grid[1], batch, length, n_states), **partial)  # per block of channels
    dC = torch.empty((grid[1], batch, length, n_states), **partial)
    dD = torch.empty((batch, channels), **partial)
    dbias = torch.empty((batch, channels), **partial)
    check_offsets("selective_scan", dy, dx, ddt, dA, dB, dC, dD)
    states_arg = states if states.numel() else torch.empty(1, **partial)
    carry = torch.empty((batch, 2, n_states, channels), **partial) if n_chunks > 1 else states_arg
    check_offsets("selective_scan", carry)
    _selective_scan_bwd_kernel[grid](x, dt, A.contiguous(), B, C, D.contiguous(),
                                     dt_bias.contiguous(), dy, states_arg, carry, dx, ddt, dA, dB,
                                     dC, dD, dbias, length, channels, n_states, batch,
                                     *_strides(x, dt, B, C), **constants)
    return (dx, ddt, dA.sum(0).t().to(A.dtype), dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype),
            dD.sum(0).to(D.dtype), dbias.sum(0).to(dt_bias.dtype))


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias):
        y, states = selective_scan_fwd(x, dt, A, B, C, D, dt_bias)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        return selective_scan_bwd(*ctx.saved_tensors, dy)


def selective_scan_fn(x, dt, A, B, C, D, dt_bias):
    """y [B L E] of the selective scan (module docstring), differentiable in every input."""
    return _SelectiveScan.apply(x, dt, A, B, C, D, dt_bias)
