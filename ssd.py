"""The structured state space duality (SSD, Mamba-2) scan and TiM4Rec's time-aware SSD block.

Three implementations of one function, the SSD scan ``y = SSM(A, B, C, dt)(x)``:

- :func:`ssd_recurrence`: the definition, one time step after the other. Slow; the reference that
  the tests hold the other two to.
- :func:`chunk_scan_torch`: the exact chunked algorithm of Mamba-2 (quadratic attention-like form
  inside a chunk, a linear recurrence between chunks) in plain PyTorch. Any device and dtype, any
  sequence length, fully differentiable. This is the path on CPU.
- mamba-ssm's Triton kernel ``mamba_chunk_scan_combined``: the same chunked algorithm, fused, on
  CUDA only.

:func:`chunk_scan` dispatches between the last two with mamba-ssm's contract. The gated RMSNorm that
follows the scan has the same pair: :func:`gated_rmsnorm_ref` and mamba-ssm's Triton ``rmsnorm_fn``.
On the Triton path, :class:`TimeAwareSSD` runs from in_proj to out_proj as one autograd node,
:class:`FusedSSDBlock`, with mamba-ssm's forward and backward functions and this project's Triton
convolution (:mod:`kernels.causal_conv`); :func:`torch_block_kernels` is its PyTorch reference.

mamba-ssm (every release up to 2.3.2.post1) imports its compiled Mamba-1 extension from the package
``__init__``, so with a Triton-only install (no CUDA build) ``import mamba_ssm`` fails. The Triton
modules themselves need no compiled code: :func:`load_triton_ops` imports them without running the
package ``__init__``.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import itertools
import logging
import math
import sys
import types
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "triton", "torch")
WHOLE_SEQUENCE_CHUNK = 64  # the PyTorch scan takes sequences up to this long as a single chunk

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# mamba-ssm's Triton kernels
# --------------------------------------------------------------------------------------------------


@functools.cache
def triton_modules() -> tuple:
    """mamba-ssm's modules ``(ssd_combined, layernorm_gated)``, or raise ImportError.

    Imports the two Triton modules without executing ``mamba_ssm/__init__.py`` when that fails,
    by registering a bare package object whose search path is the installed package's folder.
    With a GPU, the kernels' autotune choices known on this machine are put back first, and new
    ones are kept at exit (:mod:`pipeline.autotune`).
    """
    modules = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated")
    try:
        loaded = tuple(importlib.import_module(m) for m in modules)
    except ImportError as first_error:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mamba-ssm is not installed") from first_error
        for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
            del sys.modules[name]
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["mamba_ssm"] = package
        try:
            loaded = tuple(importlib.import_module(m) for m in modules)
        except ImportError as error:
            del sys.modules["mamba_ssm"]
            raise ImportError(f"mamba-ssm's Triton modules failed to import: {error}") from error
    if torch.cuda.is_available():  # autotune once per machine, not once per process
        from pipeline import autotune

        autotune.restore()
        atexit.register(autotune.save)
    return loaded


def load_triton_ops() -> tuple:
    """Return ``(mamba_chunk_scan_combined, rmsnorm_fn)`` from mamba-ssm, or raise ImportError."""
    ssd_combined, layernorm_gated = triton_modules()
    return ssd_combined.mamba_chunk_scan_combined, layernorm_gated.rmsnorm_fn


def triton_unavailable_reason() -> str | None:
    """Why the Triton path cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        load_triton_ops()
    except ImportError as error:
        return str(error)
    return None


def uses_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether ``backend`` (auto|triton|torch) runs mamba-ssm's Triton kernels for the tensor ``x``."""
    if backend == "auto":
        return x.is_cuda and triton_unavailable_reason() is None
    return backend == "triton"


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Turn ``auto|triton|torch`` into the backend that runs on ``device`` (never silently).

    ``auto`` picks Triton on CUDA when mamba-ssm's kernels load, else PyTorch, with a warning on CUDA.
    ``triton`` raises when the kernels cannot run: the user asked for them explicitly.
    """
    if requested not in BACKENDS:
        raise ValueError(f"ssd_backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    reason = "the model runs on the CPU" if not on_cuda else triton_unavailable_reason()
    if reason is None:
        return "triton"
    if requested == "triton":
        raise ValueError(f"ssd_backend=triton cannot run: {reason}")
    if on_cuda:
        logger.warning("mamba-ssm Triton kernels unavailable (%s); using the PyTorch SSD scan", reason)
    return "torch"


# --------------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------------


def _step_sizes(dt, dt_bias, dt_softplus, dt_limit):
    """``delta = clamp(softplus(dt + dt_bias), *dt_limit)`` in the compute dtype, as the kernel does."""
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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half inputs are computed in float32, as the kernel accumulates; float64 stays float64.
    return torch.promote_types(x.dtype, torch.float32)


@without_autocast  # its products in the compute dtype, under autocast too
def ssd_recurrence(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), seq_idx=None):
    """The SSD scan by its definition, one step at a time (reference; any shapes of chunk_scan).

    ``state_t = exp(delta_t A) state_{t-1} + delta_t x_t B_t^T``, ``y_t = state_t C_t + D x_t``;
    with ``seq_idx``, ``state_{t-1}`` is zero where ``seq_idx`` changes between t-1 and t.
    """
    out_dtype, cdt = x.dtype, _compute_dtype(x)
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
    """The exact chunked SSD algorithm in PyTorch (mamba-ssm's ``mamba_chunk_scan_combined`` contract).

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
    out_dtype, cdt = x.dtype, _compute_dtype(x)
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

    # 1. Inside each chunk. Mask before exp so that no inf ever enters the graph (its gradient is NaN).
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


# --------------------------------------------------------------------------------------------------
# Gated RMSNorm
# --------------------------------------------------------------------------------------------------


def gated_rmsnorm_ref(x, z, weight, eps, norm_before_gate=False):
    """``RMSNorm(x * silu(z)) * weight`` over the last axis (one group), computed in >= float32."""
    out_dtype, cdt = x.dtype, _compute_dtype(x)
    x, weight = x.to(cdt), weight.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        x = x * gate
    out = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(out_dtype)


class GatedRMSNorm(nn.Module):
    """mamba-ssm's ``RMSNormGated(E, norm_before_gate=False)``: same parameter (``weight``), same maths."""

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


# --------------------------------------------------------------------------------------------------
# The block, in_proj to out_proj, as one autograd node
# --------------------------------------------------------------------------------------------------


class BlockKernels(NamedTuple):
    """Forward and backward of the convolution, the SSD scan and the gated RMSNorm, as
    :class:`FusedSSDBlock` calls them: Triton (:func:`triton_block_kernels`) or the PyTorch
    references differentiated by autograd (:func:`torch_block_kernels`).

    ``scan_fwd(x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx) -> y`` (softplus on
    ``dt + dt_bias``);
    ``scan_bwd(dy, x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx, dx, ddt, dB, dC) -> (dA,
    dD, ddt_bias)``, writing the other gradients into the four given tensors;
    ``norm_fwd(y, z, weight, eps) -> (out, rstd)`` on [T E] rows (``rstd`` may be None);
    ``norm_bwd(dout, y, z, weight, eps, rstd, dz) -> (dy, dweight, out)``, writing dz, and giving
    the forward's output again;
    ``conv_fwd(x, weight, bias, activation, seq_idx) -> out``: the causal depthwise convolution
    and its activation on [B L C] rows, ``out`` contiguous;
    ``conv_bwd(x, weight, bias, dout, activation, dx, seq_idx) -> (dx, dweight, dbias)``, writing
    dx; ``seq_idx`` [B L] or None: the sequences laid end to end in each row (:class:`Packing`);
    ``conv(x, weight, bias, activation) -> out``: the two for autograd (the time branch's
    convolutions, outside the node).
    """

    scan_fwd: Callable
    scan_bwd: Callable
    norm_fwd: Callable
    norm_bwd: Callable
    conv_fwd: Callable
    conv_bwd: Callable
    conv: Callable


@functools.cache
def triton_block_kernels() -> BlockKernels:
    """mamba-ssm's own forward and backward functions of the scan (those its fused Mamba-2 block
    calls), and this project's Triton convolution and gated RMSNorm (:mod:`kernels.causal_conv`,
    :mod:`kernels.gated_norm`)."""
    ssd_combined, _ = triton_modules()
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd, causal_conv_act_fn
    from kernels.gated_norm import gated_rms_norm, gated_rms_norm_bwd

    def scan_fwd(x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx):
        return ssd_combined._mamba_chunk_scan_combined_fwd(
            x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
            dt_limit=dt_limit)[0]

    def scan_bwd(dy, x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx, dx, ddt, dB, dC):
        # mamba-ssm reads the forward's output (its `out`) only to gate it by z, and there is no
        # z here: x stands in for it, for the shape check
        grads = ssd_combined._mamba_chunk_scan_combined_bwd(
            dy, x, dt, A, B, C, x, chunk, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
            dt_limit=dt_limit, dx=dx, ddt=ddt, dB=dB, dC=dC)
        _, _, dA, _, _, dD, _, ddt_bias, _ = grads
        return dA, dD, ddt_bias

    def norm_bwd(dout, y, z, weight, eps, rstd, dz):
        return gated_rms_norm_bwd(dout, y, z, weight, rstd, dz)

    def conv_bwd(x, weight, bias, dout, activation, dx, seq_idx):
        # the node's own gradient buffer: the convolution's backward may write over it
        return causal_conv_act_bwd(x, weight, bias, dout, activation, dx, overwrite_dout=True,
                                   seq_idx=seq_idx)

    return BlockKernels(scan_fwd, scan_bwd, gated_rms_norm, norm_bwd, causal_conv_act, conv_bwd,
                        causal_conv_act_fn)


def torch_block_kernels() -> BlockKernels:
    """The same functions from :func:`causal_conv1d`, :func:`chunk_scan_torch` and
    :func:`gated_rmsnorm_ref` (backward by autograd, forward again): the reference that the tests
    hold the Triton ones to."""

    def scan(x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx):
        return chunk_scan_torch(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
                                dt_limit=dt_limit, seq_idx=seq_idx)

    def scan_bwd(dy, x, dt, A, B, C, chunk, D, dt_bias, dt_limit, seq_idx, dx, ddt, dB, dC):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
            y = scan(*leaves[:5], chunk, leaves[5], leaves[6], dt_limit, seq_idx)
            grads = torch.autograd.grad(y, leaves, dy)
        for given, grad in zip((dx, ddt, dB, dC), (grads[0], grads[1], grads[3], grads[4])):
            given.copy_(grad)
        return grads[2], grads[5], grads[6]

    def norm_fwd(y, z, weight, eps):
        return gated_rmsnorm_ref(y, z, weight, eps), None

    def norm_bwd(dout, y, z, weight, eps, rstd, dz):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (y, z, weight)]
            out = gated_rmsnorm_ref(*leaves, eps)
            dy, dz_, dweight = torch.autograd.grad(out, leaves, dout)
        dz.copy_(dz_)
        return dy, dweight, out.detach()

    def conv(x, weight, bias, activation, seq_idx=None):  # [B L C] -> [B L C]
        # in the weights' dtype at least, out in x's: as the Triton kernel, for bfloat16 x too
        act = F.hardswish if activation == "hardswish" else F.silu
        dtype = torch.promote_types(x.dtype, weight.dtype)
        out = causal_conv1d(x.transpose(1, 2).to(dtype), *cast(dtype, weight, bias), seq_idx)
        return act(out).transpose(1, 2).to(x.dtype).contiguous()

    def conv_bwd(x, weight, bias, dout, activation, dx, seq_idx):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
            out = conv(*leaves, activation, seq_idx)
            dx_, dweight, dbias = torch.autograd.grad(out, leaves, dout)
        return dx.copy_(dx_), dweight, dbias

    return BlockKernels(scan, scan_bwd, norm_fwd, norm_bwd, conv, conv_bwd, conv)


def at_positions(x, at):  # [B L ...], [B] -> [B ...]
    """``x[b, at[b]]`` for every b: one position of each sequence."""
    return x[torch.arange(x.shape[0], device=x.device), at]


def add_at_positions(x, at, rows):  # [B L ...], [B], [B ...]
    """``x[b, at[b]] += rows[b]`` for every b, in place; returns x."""
    return x.index_put_((torch.arange(x.shape[0], device=x.device), at), rows, accumulate=True)


class Packing(NamedTuple):
    """The real positions of a right-padded batch [B L], laid end to end in rows of slots.

    The batch's sequences, each cut to its ``len_b`` real positions, follow one another as one
    stream; the stream is cut into R rows of ``nominal`` slots, and a sequence that starts in a
    row stays whole in it: each row has ``L - 1`` more slots, for the one that runs past its end.
    Slots that hold no real position (before a row's first sequence, after its last, and after
    the stream, up to a fixed capacity, so that shapes need not depend on the batch) repeat the
    batch's first position and are numbered B: filler that nothing reads (its runs may pass state
    to one another). Rows, because mamba-ssm's scan passes its state from chunk to chunk one chunk
    after the other along a row: rows run those passes side by side (at 256d on an H100, a
    28.8 ms step in one row of 67,328 slots, 25.4 ms in rows of 8,192: BENCHMARKS.md, eighth run).

    The layers see the slots as one sequence [1 S ...] (S = R * width); the convolution and the
    scan as R rows [R width ...], with ``seq_idx``, so that nothing passes from one sequence to
    the next: they compute at the real positions what they compute there in the padded batch
    (they are causal), and the position-wise rest does too.

    ``rows`` [S]: each slot's row of the batch flattened to [B*L]; ``seq_idx`` [R width] int32:
    each slot's sequence; ``last`` [B]: the slot of each sequence's last real position.
    """

    rows: torch.Tensor
    seq_idx: torch.Tensor
    last: torch.Tensor

    ROW_SLOTS = 8192  # nominal slots per row, at most, for mamba-ssm's Triton scan
    ROW_SEQUENCES = 16  # for the PyTorch scan: rows of this many full sequences, at most

    @classmethod
    def row_slots_for(cls, triton: bool, seqlen: int) -> int:
        """Nominal slots per row: ``ROW_SLOTS`` for mamba-ssm's Triton scan; for the PyTorch
        scan, whose pass between chunks is a loop in Python (rows make it shorter, not fewer
        steps), ``ROW_SEQUENCES`` times the length."""
        return cls.ROW_SLOTS if triton else cls.ROW_SEQUENCES * seqlen

    @classmethod
    def of(cls, lengths, seqlen: int, size: int, row_slots: int | None = None) -> Packing:
        """The packing of a batch whose sequences have ``lengths`` [B] (each in [1, seqlen]) real
        positions, for a stream of ``size`` slots (at least ``lengths.sum()``: not checked, which
        would wait for the GPU), in rows of ``row_slots`` nominal slots at most (default
        ``ROW_SLOTS``)."""
        batch, device = lengths.shape[0], lengths.device
        row_slots = row_slots or cls.ROW_SLOTS
        ends = torch.cumsum(lengths, 0)  # [B]
        starts = ends - lengths
        nrows = max(1, math.ceil(size / row_slots))
        nominal = max(1, math.ceil(size / nrows))
        width = nominal + seqlen - 1
        slot = torch.arange(nrows * width, device=device)
        row = slot // width
        stream = row * nominal + slot % width  # where in the stream each slot is
        seq = torch.searchsorted(ends, stream, right=True)  # B past the stream's end
        within = seq.clamp(max=batch - 1)
        real = (seq < batch) & (starts[within] // nominal == row)
        rows = torch.where(real, within * seqlen + stream - starts[within], 0)
        seq_idx = torch.where(real, within, batch).to(torch.int32).view(nrows, width)
        last = starts // nominal * width + starts % nominal + lengths - 1
        return cls(rows, seq_idx, last)

    def pack(self, x):  # [B L ...] -> [1 S ...]
        """``x`` at the slots' positions."""
        return x.flatten(0, 1).index_select(0, self.rows).unsqueeze(0)


def in_rows(t, seq_idx):  # [1 S ...] -> [R width ...] (a view); unchanged without seq_idx
    """A packed tensor as the rows of ``seq_idx`` (:class:`Packing`), for the convolution and the
    scan."""
    return t if seq_idx is None else t.view(*seq_idx.shape, *t.shape[2:])


def _in_proj_parts(weight, bias, d_inner: int) -> tuple:
    """in_proj's weight and bias as z's part and the rest's: ``((w_z, b_z), (w_rest, b_rest))``."""
    return ((weight[:d_inner], None if bias is None else bias[:d_inner]),
            (weight[d_inner:], None if bias is None else bias[d_inner:]))


class FusedSSDBlock(torch.autograd.Function):
    """:class:`TimeAwareSSD` from its input to out_proj's output, as one autograd node.

    ``apply(u, in_weight, in_bias, gate, conv_weight, conv_bias, A, D, dt_bias, norm_weight,
    out_weight, out_bias, at, seq_idx, block, kernels)``: ``u`` [B L D] is the block's input,
    ``gate`` [B L H] the time gate of the step sizes (or None); ``block`` gives the sizes and
    settings; returns [B L D], or with ``at`` [B] (a position per sequence) the output there only,
    [B D]. With ``seq_idx`` [R width], ``u`` and ``gate`` hold a :class:`Packing`'s slots,
    [1 S ..], and ``at`` is slots: the convolution and the scan see the slots as those rows, and
    keep each sequence from the next.

    The same operations as the module path (in_proj, convolution and activation, scan, gated
    RMSNorm, out_proj), with the functions of ``kernels`` (on the GPU: mamba-ssm's scan,
    :mod:`kernels.gated_norm`, and :mod:`kernels.causal_conv`, which reads in_proj's output in
    place), kept differently for backward. Autograd would keep, per layer, in_proj's output, the
    convolution's output and its activation, copies of x, B and C made contiguous for the scan, and
    the norm's output. This node keeps the block's input (as in_proj alone would), the scan's
    output and the norm's 1/rms, and computes in_proj, the convolution, the activation and the
    norm's output again in backward (the norm's backward kernel does the latter): one
    more product the size of in_proj's, for the largest tensor that a layer would keep. It does so
    in two parts, z first, so that z and its gradient are gone before the scan's backward, where
    the memory peaks; with a time gate, the gradient of in_proj's output is allocated after it too.
    The scan's gradients of x, B and C land in one tensor, and those of x, B, C and the step sizes
    before the convolution in another, with no concatenation. mamba-ssm's fused Mamba-2 block does
    much the same, but needs the compiled causal-conv1d, has no time gate, and uses SiLU only.

    With ``at``, z's part of in_proj, the gated norm and out_proj run at those positions only
    (nothing else reads the block's output), and the node keeps the scan's output there only; the
    scan itself still runs over every position, whose states the wanted ones need.

    Under autocast (bfloat16), in_proj and out_proj multiply in bfloat16, and what they write (z,
    x, B, C, dt, the output) is bfloat16, as is what the convolution, the scan and the norm write
    from it; each of those computes in float32 inside (the scan's step sizes, decays and states;
    the norm's statistics). The step sizes times the time gate (float32) are float32. The node
    keeps the block's input in bfloat16; the gradients of u, the gate and the weights come back
    in their own dtypes (float32).
    """

    @staticmethod
    @amp_forward
    def forward(ctx, u, in_weight, in_bias, gate, conv_weight, conv_bias, A, D, dt_bias,
                norm_weight, out_weight, out_bias, at, seq_idx, block, kernels):
        batch, seqlen, _ = u.shape
        E = block.d_inner
        ctx.u_dtype = u.dtype
        u = u.to(ctx.dtype)  # [B L D], as the products take it (and as it is kept)
        w_in, b_in, w_out, b_out = cast(ctx.dtype, in_weight, in_bias, out_weight, out_bias)
        if at is None:
            z, xBC, dt = block.split_projection(F.linear(u, w_in, b_in))
        else:
            (w_z, b_z), (w_rest, b_rest) = _in_proj_parts(w_in, b_in, E)
            z = F.linear(at_positions(u, at), w_z, b_z)  # [B E]
            xBC, dt = torch.split(F.linear(u, w_rest, b_rest), [E + 2 * block.d_state,
                                                                 block.nheads], dim=-1)
        x, B, C = block.split_conv_output(kernels.conv_fwd(  # [B L ..], or packed [R width ..]
            in_rows(xBC, seq_idx), conv_weight, conv_bias, block.conv_activation, seq_idx))
        if gate is not None:
            dt = dt * gate  # [B L H]
        y = kernels.scan_fwd(x, in_rows(dt, seq_idx), A, B, C, block.chunk_size, D, dt_bias,
                             block.dt_limit, seq_idx)
        y = y.reshape(-1, E) if at is None else at_positions(y.reshape(batch, seqlen, E), at)
        normed, rstd = kernels.norm_fwd(y, z.reshape(-1, E), norm_weight, block.norm.eps)  # [T E]
        ctx.save_for_backward(u, in_weight, in_bias, gate, conv_weight, conv_bias, A, D, dt_bias,
                              norm_weight, out_weight, y, rstd, at, seq_idx)
        ctx.block, ctx.kernels, ctx.has_out_bias = block, kernels, out_bias is not None
        out = F.linear(normed, w_out, b_out)  # [T D] or [B D]
        return out.view(batch, seqlen, -1) if at is None else out

    @staticmethod
    @amp_backward
    def backward(ctx, dout):  # [B L D], or [B D] with at
        (u, in_weight, in_bias, gate, conv_weight, conv_bias, A, D, dt_bias, norm_weight,
         out_weight, y, rstd, at, seq_idx) = ctx.saved_tensors
        block, kernels = ctx.block, ctx.kernels
        E = block.d_inner
        w_in, b_in, w_out = cast(ctx.dtype, in_weight, in_bias, out_weight)
        u2 = u.reshape(-1, u.shape[-1])  # [T D]
        u_out = u2 if at is None else at_positions(u, at)  # where the output is: [T D] or [B D]
        # in_proj again in two parts, z and the rest, so that z and its gradient are gone before
        # the scan's backward (where the memory peaks)
        (w_z, b_z), (w_rest, b_rest) = _in_proj_parts(w_in, b_in, E)

        # out_proj, the gated norm (its output computed again, for out_proj's weight), z's part of
        # in_proj
        dout = dout.to(ctx.dtype).reshape(-1, dout.shape[-1])  # [T D] or [B D]
        z = F.linear(u_out, w_z, b_z)  # [T E] or [B E]
        dz = torch.empty_like(z)
        dy, dnorm_weight, normed = kernels.norm_bwd(dout @ w_out, y, z, norm_weight,
                                                    block.norm.eps, rstd, dz)
        del z
        dout_weight = dout.t() @ normed
        dout_bias = column_sums(dout) if ctx.has_out_bias else None
        del normed
        du_out = dz @ w_z  # [T D] or [B D]
        din_weight_z, din_bias_z = dz.t() @ u_out, None if in_bias is None else column_sums(dz)
        del dz
        if at is not None:  # the scan's output has no gradient where the block's is not wanted
            dy = add_at_positions(dy.new_zeros(*u.shape[:-1], E), at, dy)  # [B L E]

        # the convolution and its activation again, the scan's backward into one tensor, then the
        # convolution's backward straight into the gradient of in_proj's output
        xBCdt = F.linear(u2, w_rest, b_rest).view(*u.shape[:-1], -1)  # [B L E+2N+H]
        sizes = [E + 2 * block.d_state, block.nheads]
        xBC, dt_in = torch.split(in_rows(xBCdt, seq_idx), sizes, dim=-1)  # packed: [R width ..]
        if gate is None:  # the scan writes dt's gradient straight into that of in_proj's output
            dxBCdt = torch.empty_like(xBCdt)
            dt, ddt = dt_in, in_rows(dxBCdt, seq_idx)[..., sizes[0]:]
        else:  # into a tensor of its own: in_proj's comes after the scan's backward (the peak)
            dt = dt_in * in_rows(gate, seq_idx)
            ddt = torch.empty_like(dt)  # in the gated steps' dtype (float32 under autocast)
        conv_out = kernels.conv_fwd(xBC, conv_weight, conv_bias, block.conv_activation, seq_idx)
        dconv_out = torch.empty_like(conv_out)  # [B L E+2N]
        dx, dB, dC = block.split_conv_output(dconv_out)
        x, B, C = block.split_conv_output(conv_out)
        dA, dD, ddt_bias = kernels.scan_bwd(dy.view_as(x), x, dt, A, B, C, block.chunk_size, D,
                                            dt_bias, block.dt_limit, seq_idx, dx, ddt, dB, dC)
        del conv_out, x, B, C, dy
        dgate = None
        if gate is not None:
            dxBCdt = torch.empty_like(xBCdt)
            dgate = (ddt * dt_in).view_as(gate)
            torch.mul(ddt.view_as(gate), gate, out=dxBCdt[..., sizes[0]:])
        dxBC = in_rows(dxBCdt, seq_idx)[..., :sizes[0]]
        _, dconv_weight, dconv_bias = kernels.conv_bwd(xBC, conv_weight, conv_bias, dconv_out,
                                                       block.conv_activation, dxBC, seq_idx)
        del xBCdt, xBC, dt_in, dconv_out

        # the rest of in_proj
        dxBCdt = dxBCdt.reshape(-1, dxBCdt.shape[-1])  # [T E+2N+H]
        if at is None:
            du = du_out.addmm_(dxBCdt, w_rest).view_as(u)
        else:
            du = add_at_positions((dxBCdt @ w_rest).view_as(u), at, du_out)
        din_weight = torch.cat([din_weight_z, dxBCdt.t() @ u2])
        din_bias = None if in_bias is None else torch.cat([din_bias_z, column_sums(dxBCdt)])
        # the products' gradients in their inputs' and parameters' dtypes (a no-op without amp)
        du, din_weight, din_bias = du.to(ctx.u_dtype), *cast(in_weight.dtype, din_weight, din_bias)
        dout_weight, dout_bias = cast(out_weight.dtype, dout_weight, dout_bias)
        return (du, din_weight, din_bias, dgate, dconv_weight, dconv_bias, dA, dD, ddt_bias,
                dnorm_weight, dout_weight, dout_bias, None, None, None, None)


def column_sums(m):  # [T N] -> [N]
    """``m.sum(0)`` as a matrix-vector product, which reads a tall [T N] matrix at a higher
    bandwidth than PyTorch's column reduction on a GPU (the bias gradients: BENCHMARKS.md)."""
    return torch.mv(m.t(), m.new_ones(m.shape[0]))


# --------------------------------------------------------------------------------------------------
# TiM4Rec's time-aware SSD block
# --------------------------------------------------------------------------------------------------


class CausalConv1d(nn.Conv1d):
    """Depthwise Conv1d over the sequence that sees only the current and earlier steps.

    A plain ``nn.Conv1d`` (so the state_dict keys and the weight shape [channels, 1, K] match
    upstream checkpoints) with K - 1 steps of left context: pad both sides, keep the first L outputs.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1)

    def forward(self, x):  # [B C L] -> [B C L]
        return causal_conv1d(x, self.weight, self.bias)


def causal_conv1d(x, weight, bias, seq_idx=None):
    """The convolution of :class:`CausalConv1d`: x [B C L], weight [C 1 K] -> [B C L].

    ``seq_idx`` [B L] (sequences laid end to end): a step sees only the earlier steps of its own
    sequence, as if each began after K - 1 zeros (:func:`conv_less_crossings` on the CPU,
    :func:`conv_masked` elsewhere: the same values).
    """
    length, width = x.shape[-1], weight.shape[-1]
    if seq_idx is not None:
        return (conv_less_crossings if x.device.type == "cpu" else conv_masked)(
            x, weight, bias, seq_idx)
    if x.device.type == "cpu" and x.stride(1) == 1:
        # x is a [B L C] tensor seen as [B C L]. On the CPU, the same convolution as a 2-D one
        # over that channels-last layout runs forward and backward in half the time, with no
        # copy into [B C L]; the result is again channels-last ([B L C] memory).
        out = F.conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, padding=(0, width - 1),
                       groups=x.shape[1])  # [B C 1 L+K-1]
        return out.squeeze(2)[..., :length]
    return F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., :length]


def conv_masked(x, weight, bias, seq_idx):  # [B C L], [C 1 K], [C], [B L] -> [B C L]
    """:func:`causal_conv1d` with ``seq_idx`` as K shifted products, each masked where the
    sequence changes: no wait for the host, so a GPU step can be captured."""
    length, width = x.shape[-1], weight.shape[-1]
    # on [B L C] (channels contiguous, as in_proj writes them): the products run fastest there
    padded = F.pad(x.transpose(1, 2), (0, 0, width - 1, 0))  # [B L+K-1 C]
    seq = F.pad(seq_idx, (width - 1, 0), value=-1)
    out = padded[:, width - 1:] * weight[:, 0, -1]  # the step itself: always its sequence
    for k in range(width - 1):
        same = (seq[:, k:k + length] == seq_idx).unsqueeze(-1)  # [B L 1]
        out = out.addcmul(padded[:, k:k + length] * same, weight[:, 0, k])
    return (out if bias is None else out + bias).transpose(1, 2)  # [B C L]


def conv_less_crossings(x, weight, bias, seq_idx):  # [B C L], [C 1 K], [C], [B L] -> [B C L]
    """:func:`causal_conv1d` with ``seq_idx`` as the convolution over whole rows, less what the
    first K - 1 steps of each sequence read before its start: few steps, found on the host (on the
    CPU, no wait), and one pass over the output where :func:`conv_masked` makes 2K."""
    width = weight.shape[-1]
    b, t, tap = [], [], []
    for shift in range(1, width):  # tap K-1-shift reads the step `shift` before
        rows, steps = torch.nonzero(seq_idx[:, shift:] != seq_idx[:, :-shift], as_tuple=True)
        b.append(rows)
        t.append(steps + shift)
        tap.append(torch.full_like(rows, width - 1 - shift))
    b, t, tap = torch.cat(b), torch.cat(t), torch.cat(tap)
    read = x[b, :, t + tap - (width - 1)] * weight[:, 0].t()[tap]  # [n C]
    out = causal_conv1d(x, weight, bias).transpose(1, 2)  # [B L C]
    return out.index_put((b, t), -read, accumulate=True).transpose(1, 2)


class TimeAwareSSD(nn.Module):
    """The TiSSD block of TiM4Rec: an SSD (Mamba-2) mixer whose step sizes are modulated by time.

    ``forward(u, tau)`` takes the sequence ``u`` [B L D] and the normalised time-interval signal
    ``tau`` [B H L] (or None without time) and returns ``(out [B L D], tau_next [B H L] or None)``.
    Submodule and parameter names follow the authors' code, so their checkpoints load unchanged.

    NOTE: the convolution on x, B, C is followed by Hardswish, as in the authors' code for every
    shipped configuration (their code uses SiLU only when causal-conv1d is installed and the head count
    is a multiple of 8). Set ``conv_activation="silu"`` for Mamba-2's usual activation.

    ``fused``: where mamba-ssm's Triton kernels run, the block from in_proj to out_proj runs as
    one autograd node, :class:`FusedSSDBlock` (the same values in less time and memory:
    BENCHMARKS.md); ``fused=False`` runs it as separate modules (the convolution through PyTorch),
    the reference it is tested against.

    With ``is_time=False, conv_activation="silu", bias=False`` this is mamba-ssm's ``Mamba2`` mixer
    with its defaults (one B/C group, projections without bias), as SSD4Rec uses it.

    Under autocast (bfloat16), in_proj and out_proj multiply in bfloat16; the convolution, the scan
    and the gated norm take and give bfloat16 and compute in float32 inside; the time branch runs
    in float32 (see :class:`FusedSSDBlock` and the NOTE of :class:`tim4rec.TiM4Rec`).
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
        (w_z, b_z), (w_rest, b_rest) = _in_proj_parts(self.in_proj.weight, self.in_proj.bias, E)
        z = F.linear(u if at is None else at_positions(u, at), w_z, b_z)
        if u.device.type != "cpu":
            return z, *torch.split(F.linear(u, w_rest, b_rest), sizes[1:], dim=-1)
        bounds = [0, *itertools.accumulate(sizes[1:])]
        return z, *(F.linear(u, w_rest[a:b], None if b_rest is None else b_rest[a:b])
                    for a, b in itertools.pairwise(bounds))

    def scan_chunk_size(self, x) -> int:
        """``chunk_size`` for the Triton kernel; for the PyTorch scan, a sequence of up to
        ``WHOLE_SEQUENCE_CHUNK`` steps is one chunk: no padding to a multiple of the chunk and no
        pass between chunks (0.5-0.7 of the time on a CPU at L 50: bench/cpu_parts.py). Chunking
        orders the floating-point operations; it does not change what is computed."""
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
        """Gated residual mix of this layer's time signal and its gate, normalised over the sequence."""
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
        E, N, H, P = self.d_inner, self.d_state, self.nheads, self.head_dim
        seq_idx = None if packing is None else packing.seq_idx
        z, xBC, dt = self.project_in(u, at)
        xBC = self.convolve(in_rows(xBC, seq_idx), seq_idx)  # [B L E+2N], or [R width E+2N]
        x, B, C = torch.split(xBC, [E, N, N], dim=-1)

        tau_next = None
        if self.is_time:
            g = self.time_step_gate(tau)  # [B H L]
            dt = dt * self.step_gate(g, packing)  # [B L H]
            tau_next = self.next_time_signal(tau, g)

        y = chunk_scan(
            x.unflatten(-1, (H, P)), in_rows(dt, seq_idx), -torch.exp(self.A_log),
            B.unsqueeze(2), C.unsqueeze(2), self.scan_chunk_size(x), D=self.D, dt_bias=self.dt_bias,
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
