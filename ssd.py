"""TiM4Rec's time-aware SSD layer (:class:`TimeAwareSSD`) and the SSD scan (:func:`chunk_scan`).

The layer is the paper's TiSSD block. For an input u [B L D] and the time signal tau [B H L] (E
inner channels in H heads of P, N states), :meth:`TimeAwareSSD.forward` computes, in this order:

1. ``z [E], xBC [E+2N], dt [H] = in_proj(u)`` (:meth:`~TimeAwareSSD.project_in`)
2. ``x [E], B [N], C [N] = Hardswish(conv1d(xBC))``, a causal depthwise convolution over the
   sequence, SiLU with ``conv_activation="silu"`` (:meth:`~TimeAwareSSD.convolve`)
3. the time gate ``g = Hardswish(conv_2(Hardswish(conv_1(tau * MLP(tau)))))`` [B H L] scales the
   step sizes: ``dt' = dt * g`` (:meth:`~TimeAwareSSD.time_step_gate`)
4. the SSD scan per head, with ``delta_t = softplus(dt'_t + dt_bias)`` and ``A = -exp(A_log)``::

       state_t = exp(delta_t A) state_{t-1} + delta_t x_t B_t^T,    y_t = state_t C_t + D x_t

   or as one product, ``y = (L o C B^T)(delta x) + D x`` with the time-aware mask
   ``L[t, s] = exp(A sum_{k=s+1..t} delta_k)`` for s <= t (:func:`chunk_scan`)
5. ``y = RMSNorm(y * silu(z)) * weight`` (:class:`GatedRMSNorm`)
6. ``out = out_proj(y)``
7. the next layer's time signal ``tau' = LayerNorm_L(r tau + (1 - r) g)`` with
   ``r = Sigmoid(Linear(tau))`` (:meth:`~TimeAwareSSD.next_time_signal`)

The scan has three implementations of one function, held to one another by the tests:
:func:`ssd_recurrence` (its definition, one step after the other: the reference),
:func:`chunk_scan_torch` (Mamba-2's exact chunked algorithm in PyTorch: any device, the path on the
CPU) and mamba-ssm's Triton kernel (CUDA); :func:`chunk_scan` chooses between the last two.

The mechanics live beside this file: :mod:`ssd_ops.backend` (loading mamba-ssm's Triton modules,
the backend choice), :mod:`ssd_ops.scan` (the PyTorch scans), :mod:`ssd_ops.packing` (a batch's
real positions laid end to end), :mod:`ssd_ops.fused_block` (steps 1-6 as one autograd node on the
Triton path) with :mod:`ssd_ops.block_kernels` (the functions it computes with), and
:mod:`ssd_ops.amp` (autocast); the convolution and the gated norm in PyTorch are
:mod:`kernels.causal_conv_ref` and :mod:`kernels.gated_norm_ref`, beside their Triton kernels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.causal_conv_ref import causal_conv1d
from kernels.gated_norm_ref import gated_rmsnorm_ref
from ssd_ops.amp import without_autocast
from ssd_ops.backend import BACKENDS, load_triton_ops, uses_triton
from ssd_ops.block_kernels import BlockKernels, triton_block_kernels
from ssd_ops.fused_block import FusedSSDBlock, in_proj_parts
from ssd_ops.packing import Packing, at_positions, in_rows
from ssd_ops.scan import chunk_scan_torch, ssd_recurrence

__all__ = ["WHOLE_SEQUENCE_CHUNK", "CausalConv1d", "GatedRMSNorm", "TimeAwareSSD", "chunk_scan",
           "chunk_scan_torch", "ssd_recurrence"]

WHOLE_SEQUENCE_CHUNK = 64  # the PyTorch scan takes sequences up to this long as a single chunk


def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, float("inf")), backend="auto", seq_idx=None):
    """SSD scan with the contract of mamba-ssm's ``mamba_chunk_scan_combined``.

    Args:
        x: [batch, seqlen, nheads, headdim]
        dt: [batch, seqlen, nheads] raw step sizes (before ``dt_bias``, softplus and ``dt_limit``)
        A: [nheads] (negative for a decaying state)
        B, C: [batch, seqlen, ngroups, dstate]; nheads must be a multiple of ngroups
        chunk_size: steps per chunk
        D: [nheads] or [nheads, headdim] skip connection, optional
        z: [batch, seqlen, nheads, headdim]; the output is multiplied by ``silu(z)``, optional
        dt_bias: [nheads], optional
        dt_softplus: apply softplus to ``dt + dt_bias``
        dt_limit: clamp of the step sizes
        backend: ``auto`` (Triton on CUDA when available), ``triton`` or ``torch``
        seq_idx: [batch, seqlen] int32: sequences laid end to end, each a run of steps with a
            number of its own, each scanned from the zero state (optional)
    Returns:
        y: [batch, seqlen, nheads, headdim]
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if uses_triton(backend, x):
        scan, _ = load_triton_ops()
        return scan(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, seq_idx=seq_idx,
                    dt_softplus=dt_softplus, dt_limit=tuple(dt_limit))
    return chunk_scan_torch(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                            dt_softplus=dt_softplus, dt_limit=dt_limit, seq_idx=seq_idx)


class CausalConv1d(nn.Conv1d):
    """Depthwise Conv1d over the sequence that sees only the current and earlier steps.

    A plain ``nn.Conv1d`` (so the state_dict keys and the weight shape [channels, 1, K] match
    upstream checkpoints) with K - 1 steps of left context: pad both sides, keep the first L
    outputs (:func:`kernels.causal_conv_ref.causal_conv1d`).
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1)

    def forward(self, x):  # [B C L] -> [B C L]
        return causal_conv1d(x, self.weight, self.bias)


class GatedRMSNorm(nn.Module):
    """mamba-ssm's ``RMSNormGated(E, norm_before_gate=False)``: same parameter (``weight``), same
    maths; mamba-ssm's Triton ``rmsnorm_fn`` where its kernels run, else
    :func:`kernels.gated_norm_ref.gated_rmsnorm_ref`."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x, z=None):
        if uses_triton(self.backend, x):
            _, rmsnorm_fn = load_triton_ops()
            return rmsnorm_fn(x, self.weight, None, z=z, eps=self.eps, group_size=None,
                              norm_before_gate=self.norm_before_gate)
        return gated_rmsnorm_ref(x, z, self.weight, self.eps, self.norm_before_gate)


class TimeAwareSSD(nn.Module):
    """The TiSSD block of TiM4Rec: an SSD (Mamba-2) mixer whose step sizes are modulated by time.

    ``forward(u, tau)`` takes the sequence ``u`` [B L D] and the normalised time-interval signal
    ``tau`` [B H L] (or None without time) and returns ``(out [B L D], tau_next [B H L] or None)``.
    Submodule and parameter names follow the authors' code, so their checkpoints load unchanged.

    NOTE: the convolution on x, B, C is followed by Hardswish, as in the authors' code for every
    shipped configuration (their code uses SiLU only when causal-conv1d is installed and the head
    count is a multiple of 8). Set ``conv_activation="silu"`` for Mamba-2's usual activation.

    ``fused``: where mamba-ssm's Triton kernels run, the block from in_proj to out_proj runs as
    one autograd node, :class:`~ssd_ops.fused_block.FusedSSDBlock` (the same values in less time
    and memory: BENCHMARKS.md, History: commit fe9c268); ``fused=False`` runs it as separate
    modules (the convolution through PyTorch), the reference it is tested against.

    With ``is_time=False, conv_activation="silu", bias=False`` this is mamba-ssm's ``Mamba2`` mixer
    with its defaults (one B/C group, projections without bias), as SSD4Rec uses it.

    Under autocast (bfloat16), in_proj and out_proj multiply in bfloat16; the convolution, the scan
    and the gated norm take and give bfloat16 and compute in float32 inside; the time branch runs
    in float32 (see :class:`~ssd_ops.fused_block.FusedSSDBlock` and the NOTE of
    :class:`tim4rec.TiM4Rec`).
    """

    def __init__(self, d_model: int, max_seq_length: int, d_state: int = 32, d_conv: int = 4,
                 expand: int = 2, head_dim: int = 32, chunk_size: int = 32, norm_eps: float = 1e-5,
                 is_time: bool = True, p2p_residual: bool = False, time_drop_out: float = 0.0,
                 conv_activation: str = "hardswish", bias: bool = True, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, A_init_range: tuple = (1, 16),
                 dt_limit: tuple = (0.0, float("inf")), backend: str = "auto",
                 fused: bool = True):
        super().__init__()
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"head_dim ({head_dim}) must divide hidden_size * expand ({d_inner})")
        if chunk_size < 1 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
        if conv_activation not in ("hardswish", "silu"):
            raise ValueError(f"conv_activation must be hardswish or silu, got {conv_activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"ssd_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.d_inner, self.d_state, self.head_dim = d_inner, d_state, head_dim
        self.nheads = d_inner // head_dim
        self.chunk_size, self.dt_limit, self.backend = chunk_size, tuple(dt_limit), backend
        self.is_time = is_time
        self.fused = fused
        self.conv_activation = conv_activation
        self.activation = nn.Hardswish() if conv_activation == "hardswish" else nn.SiLU()

        # z [E], xBC [E + 2N], dt [H]
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_state + self.nheads, bias=bias)
        self.conv1d = CausalConv1d(d_inner + 2 * d_state, d_conv)

        if is_time:
            L, H = max_seq_length, self.nheads
            self.conv1d4time_1 = CausalConv1d(H, d_conv)
            self.conv1d4time_2 = CausalConv1d(H, d_conv)
            self.mlp4time_scale = nn.Sequential(
                nn.Dropout(time_drop_out), nn.Linear(L, L), nn.SiLU(), nn.Linear(L, L))
            self.time_gate_residual = nn.Sequential(
                nn.Dropout(time_drop_out), nn.Linear(L, L if p2p_residual else 1), nn.Sigmoid())
            self.time_layer_norm = nn.LayerNorm(L, eps=norm_eps)

        # Step sizes log-uniform in [dt_min, dt_max]; dt_bias is their inverse softplus.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

        self.norm = GatedRMSNorm(d_inner, eps=norm_eps, norm_before_gate=False, backend=backend)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def project_in(self, u, at=None):
        """``in_proj(u)`` split into z [B L E], xBC [B L E+2N] and dt [B L H]; with ``at`` [B],
        z only at those positions, [B E].

        On the CPU, as three products with slices of the one ``in_proj`` weight: each part comes out
        contiguous (the convolution then reads xBC without a copy), and the backward pass needs no
        concatenation of their gradients. Elsewhere as one product split in three, or with ``at``
        as two (z's part at the positions, the rest everywhere).
        """
        E, N = self.d_inner, self.d_state
        sizes = [E, E + 2 * N, self.nheads]
        if u.device.type != "cpu" and at is None:
            return torch.split(self.in_proj(u), sizes, dim=-1)
        (w_z, b_z), (w_rest, b_rest) = in_proj_parts(self.in_proj.weight, self.in_proj.bias, E)
        z = F.linear(u if at is None else at_positions(u, at), w_z, b_z)
        if u.device.type != "cpu":
            return z, *torch.split(F.linear(u, w_rest, b_rest), sizes[1:], dim=-1)
        bounds = [0, *itertools.accumulate(sizes[1:])]
        return z, *(F.linear(u, w_rest[a:b], None if b_rest is None else b_rest[a:b])
                    for a, b in itertools.pairwise(bounds))

    def scan_chunk_size(self, x) -> int:
        """``chunk_size`` for the Triton kernel; for the PyTorch scan, a sequence of up to
        ``WHOLE_SEQUENCE_CHUNK`` steps is one chunk: no padding to a multiple of the chunk and no
        pass between chunks (faster on a CPU: BENCHMARKS.md, History: ``bench/cpu_parts.py``).
        Chunking orders the floating-point operations; it does not change what is computed."""
        seqlen = x.shape[1]
        if uses_triton(self.backend, x) or seqlen > WHOLE_SEQUENCE_CHUNK:
            return self.chunk_size
        return max(seqlen, 1)

    def convolve(self, xBC, seq_idx=None):  # [B L E+2N] -> [B L E+2N]
        """The causal depthwise convolution over the sequence (each of ``seq_idx``'s on its own),
        then the activation: computed in the weights' dtype at least, returned in xBC's (as the
        Triton kernel does: under autocast, from bfloat16 to bfloat16 through float32)."""
        dtype = torch.promote_types(xBC.dtype, self.conv1d.weight.dtype)
        with torch.autocast(xBC.device.type, enabled=False):
            x = xBC.transpose(1, 2).to(dtype)  # [B E+2N L]
            if seq_idx is not None:
                x = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias, seq_idx)
            else:
                x = self.conv1d(x)
            return self.activation(x.transpose(1, 2)).to(xBC.dtype)

    def split_projection(self, zxbcdt):  # [B L 2E+2N+H] -> z [B L E], xBC [B L E+2N], dt [B L H]
        return torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * self.d_state, self.nheads],
                           dim=-1)

    def split_conv_output(self, xBC):  # [B L E+2N] -> x [B L H P], B and C [B L 1 N] (views)
        x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
        return x.unflatten(-1, (self.nheads, self.head_dim)), B.unsqueeze(2), C.unsqueeze(2)

    @without_autocast  # the time branch stays in the weights' dtype (float32) under autocast
    def time_step_gate(self, tau, conv: Callable | None = None):
        """``g = Hardswish(conv2(Hardswish(conv1(tau * MLP(tau)))))`` [B H L]: the step sizes'
        factor.

        ``conv``: the convolutions as :attr:`BlockKernels.conv` computes them, on [B L H] rows (on
        the GPU, PyTorch's depthwise convolution is slow at this size); else the modules.
        """
        g = tau * self.mlp4time_scale(tau)
        if conv is not None:
            g = g.transpose(1, 2).contiguous()  # [B L H]
            for module in (self.conv1d4time_1, self.conv1d4time_2):
                g = conv(g, module.weight, module.bias, "hardswish")
            return g.transpose(1, 2)  # [B H L]
        g = F.hardswish(self.conv1d4time_1(g))
        return F.hardswish(self.conv1d4time_2(g))

    @staticmethod
    def step_gate(g, packing: Packing | None = None):  # [B H L] -> [B L H], or [1 S H] packed
        """The time gate as the step sizes' factor: [B L H], or at the slots of ``packing``."""
        g = g.transpose(1, 2)
        return g if packing is None else packing.pack(g)

    @without_autocast
    def next_time_signal(self, tau, g):
        """Gated residual mix of this layer's time signal and its gate, normalised over the
        sequence."""
        r = self.time_gate_residual(tau)  # [B H L] or [B H 1]
        return self.time_layer_norm(r * tau + (1 - r) * g)

    def forward(self, u, tau=None, at=None, packing: Packing | None = None):
        """``(out, tau_next)``: out [B L D], or with ``at`` [B] (one position per sequence) the
        output there only, [B D], for less work: z's part of in_proj, the gated norm and out_proj
        then run at those positions alone.

        ``packing``: ``u`` [1 S D] holds the batch's real positions (:class:`Packing`), and so
        does ``out``; ``at`` are slots. ``tau`` [B H L] and ``tau_next`` keep the padded layout:
        the time branch mixes positions along the whole sequence, padding included.
        """
        if self.fused and uses_triton(self.backend, u):
            return self.forward_fused(u, tau, triton_block_kernels(), at, packing)
        batch, seqlen, _ = u.shape
        E = self.d_inner
        seq_idx = None if packing is None else packing.seq_idx
        z, xBC, dt = self.project_in(u, at)
        xBC = self.convolve(in_rows(xBC, seq_idx), seq_idx)  # [B L E+2N], or [R width E+2N]
        x, B, C = self.split_conv_output(xBC)  # [.. H P], [.. 1 N] (views)

        tau_next = None
        if self.is_time:
            g = self.time_step_gate(tau)  # [B H L]
            dt = dt * self.step_gate(g, packing)  # [B L H]
            tau_next = self.next_time_signal(tau, g)

        y = chunk_scan(
            x, in_rows(dt, seq_idx), -torch.exp(self.A_log), B, C, self.scan_chunk_size(x),
            D=self.D, dt_bias=self.dt_bias,
            dt_softplus=True, dt_limit=self.dt_limit, backend=self.backend, seq_idx=seq_idx,
        ).reshape(batch, seqlen, E)  # [B L E]
        if at is not None:
            y = at_positions(y, at)  # [B E]
        return self.out_proj(self.norm(y, z)), tau_next

    def forward_fused(self, u, tau, kernels: BlockKernels, at=None, packing: Packing | None = None):
        """:meth:`forward` with in_proj to out_proj as one :class:`FusedSSDBlock` node."""
        g = self.time_step_gate(tau, kernels.conv) if self.is_time else None  # [B H L]
        out = FusedSSDBlock.apply(
            u, self.in_proj.weight, self.in_proj.bias,
            None if g is None else self.step_gate(g, packing), self.conv1d.weight,
            self.conv1d.bias, -torch.exp(self.A_log), self.D, self.dt_bias, self.norm.weight,
            self.out_proj.weight, self.out_proj.bias, at,
            None if packing is None else packing.seq_idx, self, kernels)
        return out, (self.next_time_signal(tau, g) if self.is_time else None)
