"""The SSD scan in PyTorch: by its definition (:func:`ssd_recurrence`, the reference) and by the
exact chunked algorithm of Mamba-2 (:func:`chunk_scan_torch`, the path on the CPU).

Both take the arguments of mamba-ssm's ``mamba_chunk_scan_combined`` (:func:`ssd.chunk_scan`
lists them) and compute what it computes: the tests hold the chunked scan and mamba-ssm's kernel
to the recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import compute_dtype
from ssd_ops.amp import without_autocast


def _step_sizes(dt, dt_bias, dt_softplus, dt_limit):
    """``delta = clamp(softplus(dt + dt_bias), *dt_limit)`` in the compute dtype, as the kernel
    does."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20 as in the kernel: identity above it
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def _heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H / G), as in mamba-ssm."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def _skip_and_gate(y, x, D, z):
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y


@without_autocast  # its products in the compute dtype, under autocast too
def ssd_recurrence(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), seq_idx=None):
    """The SSD scan by its definition, one step at a time (reference; any shapes of chunk_scan).

    ``state_t = exp(delta_t A) state_{t-1} + delta_t x_t B_t^T``, ``y_t = state_t C_t + D x_t``;
    with ``seq_idx``, ``state_{t-1}`` is zero where ``seq_idx`` changes between t-1 and t.
    """
    out_dtype, cdt = x.dtype, compute_dtype(x.dtype)
    x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))
    batch, seqlen, nheads, headdim = x.shape
    delta = _step_sizes(dt, None if dt_bias is None else dt_bias.to(cdt), dt_softplus, dt_limit)
    B, C = _heads(B, nheads), _heads(C, nheads)  # [b l h n]
    state = x.new_zeros(batch, nheads, headdim, B.shape[-1])  # [b h p n]
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:  # a new sequence starts from the zero state
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None, None, None]
        decay = torch.exp(delta[:, t] * A)[:, :, None, None]  # [b h 1 1]
        inject = (delta[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # [b h p n]
        state = decay * state + inject
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)  # [b l h p]
    y = _skip_and_gate(y, x, None if D is None else D.to(cdt), None if z is None else z.to(cdt))
    return y.to(out_dtype)


@without_autocast  # its products (and so its states) in the compute dtype, under autocast too
def chunk_scan_torch(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), seq_idx=None):
    """The exact chunked SSD algorithm in PyTorch (the contract of mamba-ssm's
    ``mamba_chunk_scan_combined``).

    Inside a chunk of Q steps: ``y = (L o C B^T)(delta x)`` with the decay mask
    ``L[t, s] = exp(sum_{k=s+1..t} delta_k A)`` for ``s <= t``. Between chunks: each chunk's final
    state is passed on with the chunk's total decay, and read out by the next chunk through ``C``.
    The sequence is zero-padded to a multiple of Q with ``delta = 0`` (no decay, no input), which
    leaves every real position unchanged.

    Heads are split as (group g, head-in-group r) so that what a group's heads share, ``C B^T`` and
    the products with B and C, is computed once per group as one matmul, never copied per head.

    ``seq_idx`` [b l] (sequences laid end to end, each a run of steps with a number of its own,
    as mamba-ssm takes them): nothing passes from one sequence to the next. As in mamba-ssm:
    inside a chunk, ``L[t, s] = 0`` across sequences; a chunk's state holds only the steps of the
    sequence it ends in, and is passed on only to a chunk that ends in the same one; a step reads
    the entering state only if it belongs to the sequence the previous chunk ended in.

    Half-precision inputs (bfloat16 under autocast) are computed in float32: the step sizes,
    their softplus and decays, every product and every state; y comes out in x's dtype.
    """
    out_dtype, cdt = x.dtype, compute_dtype(x.dtype)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    r = nheads // ngroups
    x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))
    delta = _step_sizes(dt, None if dt_bias is None else dt_bias.to(cdt), dt_softplus, dt_limit)

    pad = (-seqlen) % chunk_size
    nc, q = (seqlen + pad) // chunk_size, chunk_size

    def chunked(t, *tail):  # [b l ...] -> [b c q g *tail], zero-padded
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, nc, q, ngroups, *tail)

    xc = chunked(x, r, headdim).permute(0, 3, 1, 2, 4, 5)  # [b g c q r p] (a view)
    dtc = chunked(delta, r).permute(0, 3, 4, 1, 2)  # [b g r c q]
    Bc = chunked(B, dstate).permute(0, 3, 1, 2, 4)  # [b g c q n]
    Cc = chunked(C, dstate).permute(0, 3, 1, 2, 4)  # [b g c q n]
    dA_cs = torch.cumsum(dtc * A.reshape(ngroups, r, 1, 1), dim=-1)  # [b g r c q], from chunk start

    def per_step(t):  # [b g r c q] -> [b g c q r 1], to scale [b g c q r p]
        return t.permute(0, 1, 3, 4, 2)[..., None]

    x_dt = xc * per_step(dtc)  # [b g c q r p]

    # The sequence of each step, and of the last step of each chunk (padding: the last sequence's);
    # masks made of them are [b 1 c ..], for [b g c ..].
    if seq_idx is not None:
        seqc = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], 1).view(batch, 1, nc, q)
        chunk_end = seqc[..., -1]  # [b 1 c]

    # 1. Inside each chunk. Mask before exp so that no inf ever enters the graph (its gradient is
    # NaN).
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:  # [b 1 1 c t s]
        causal = causal & (seqc[..., :, None] == seqc[..., None, :]).unsqueeze(1)
    log_decay = (dA_cs[..., :, None] - dA_cs[..., None, :]).masked_fill(~causal, float("-inf"))
    scores = (Cc @ Bc.transpose(-1, -2))[:, :, None] * torch.exp(log_decay)  # [b g r c t s]
    y = (scores @ x_dt.permute(0, 1, 4, 2, 3, 5)).permute(0, 1, 3, 4, 2, 5)  # [b g c q r p]

    if nc > 1:
        # 2. The state each chunk leaves behind (the last chunk's is never read), as [n, (r p)].
        to_end = per_step(torch.exp(dA_cs[..., -1:] - dA_cs))  # [b g c q r 1]
        if seq_idx is not None:  # only the steps of the sequence the chunk ends in
            to_end = to_end * (seqc == chunk_end[..., None])[..., None, None]
        inputs = (x_dt * to_end)[:, :, :-1].reshape(batch, ngroups, nc - 1, q, r * headdim)
        chunk_states = Bc[:, :, :-1].transpose(-1, -2) @ inputs  # [b g c-1 n (r p)]

        # 3. Pass states from chunk to chunk (few chunks: a loop is exact and cheap). Each chunk's
        # slices through unbind, whose backward stacks their gradients once (indexing per chunk
        # would build a whole zero gradient per chunk: quadratic in the chunks).
        chunk_decay = torch.exp(dA_cs[..., -1]).permute(0, 1, 3, 2)[:, :, :, None, :, None]
        if seq_idx is not None:  # the state entering chunk c goes on only if c ends in its sequence
            carry = F.pad(chunk_end[..., 1:] == chunk_end[..., :-1], (1, 0), value=True)
            chunk_decay = chunk_decay * carry[..., None, None, None]  # [b 1 c 1 1 1]
        state = x.new_zeros(batch, ngroups, dstate, r, headdim)  # [b g n r p]
        entering = [state]
        for decay, inject in zip(chunk_decay.unbind(2), chunk_states.unbind(2)):
            state = decay * state + inject.view_as(state)
            entering.append(state)
        entering = torch.stack(entering, dim=2).reshape(batch, ngroups, nc, dstate, r * headdim)

        # 4. What the entering state contributes at each step of its chunk.
        y_off = (Cc @ entering).view(batch, ngroups, nc, q, r, headdim)  # [b g c q r p]
        if seq_idx is not None:  # read by the steps of the sequence the previous chunk ended in
            entered = F.pad(chunk_end[..., :-1], (1, 0), value=-1)  # [b 1 c]
            y_off = y_off * (seqc == entered[..., None])[..., None, None]
        y = y + y_off * per_step(torch.exp(dA_cs))

    y = y.permute(0, 2, 3, 1, 4, 5).reshape(batch, nc * q, nheads, headdim)[:, :seqlen]  # [b l h p]
    y = _skip_and_gate(y, x, None if D is None else D.to(cdt), None if z is None else z.to(cdt))
    return y.to(out_dtype)
