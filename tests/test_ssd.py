"""The SSD scan and the gated RMSNorm: every fast path against its plain reference."""

import pytest
import torch

import ssd
from kernels.causal_conv_ref import causal_conv1d, conv_less_crossings, conv_masked
from kernels.gated_norm_ref import gated_rmsnorm_ref
from ssd_ops.backend import resolve_backend, triton_unavailable_reason
from ssd_ops.block_kernels import torch_block_kernels
from ssd_ops.packing import Packing, at_positions
from tests.numerics import rel_err

F64 = torch.float64


def random_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype=F64, device="cpu",
                  D_shape="head", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device=device, dtype=dtype)

    inputs = dict(
        x=rand(batch, seqlen, nheads, headdim),
        dt=rand(batch, seqlen, nheads),
        A=(-torch.rand(nheads, generator=g, dtype=F64).mul(4).add(0.5)
           .to(device=device, dtype=dtype)),
        B=rand(batch, seqlen, ngroups, dstate),
        C=rand(batch, seqlen, ngroups, dstate),
        D=(rand(nheads) if D_shape == "head"
           else rand(nheads, headdim) if D_shape == "channel" else None),
        z=rand(batch, seqlen, nheads, headdim),
        dt_bias=rand(nheads, scale=0.5),
    )
    for key in ("x", "dt", "B", "C", "z", "dt_bias"):
        inputs[key].requires_grad_(True)
    return inputs


def outputs_and_grads(fn, inputs, **kwargs):
    y = fn(**inputs, **kwargs)
    wanted = [k for k in ("x", "dt", "B", "C", "z", "dt_bias") if inputs[k].requires_grad]
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(y)
    grads = torch.autograd.grad((y * weights).sum(), [inputs[k] for k in wanted])
    return y, dict(zip(wanted, grads))


@pytest.mark.parametrize("seqlen,chunk_size", [
    (1, 4), (7, 4), (37, 8), (50, 32), (64, 16), (50, 64),
    (37, 37), (50, 50)])  # the whole sequence, as on CPU
@pytest.mark.parametrize("nheads,ngroups", [(4, 1), (4, 2), (3, 3)])
def test_chunked_scan_equals_recurrence_float64(seqlen, chunk_size, nheads, ngroups):
    inputs = random_inputs(2, seqlen, nheads, 5, ngroups, 6)
    y_ref, g_ref = outputs_and_grads(ssd.ssd_recurrence, inputs, dt_softplus=True)
    y, g = outputs_and_grads(ssd.chunk_scan_torch, inputs, chunk_size=chunk_size, dt_softplus=True)
    assert rel_err(y, y_ref) < 1e-10
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-10, name


@pytest.mark.parametrize("D_shape", ["head", "channel", None])
@pytest.mark.parametrize("softplus,dt_limit", [(True, (0.0, float("inf"))), (True, (0.05, 0.5)),
                                               (False, (0.0, float("inf")))])
def test_chunked_scan_options_equal_recurrence(D_shape, softplus, dt_limit):
    inputs = random_inputs(3, 21, 2, 4, 1, 3, D_shape=D_shape, seed=3)
    if not softplus:  # raw step sizes must be positive to be meaningful
        inputs["dt"] = inputs["dt"].detach().abs().requires_grad_(True)
    kwargs = dict(dt_softplus=softplus, dt_limit=dt_limit)
    y_ref, g_ref = outputs_and_grads(ssd.ssd_recurrence, inputs, **kwargs)
    y, g = outputs_and_grads(ssd.chunk_scan_torch, inputs, chunk_size=8, **kwargs)
    assert rel_err(y, y_ref) < 1e-10
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-10, name


# Sequences laid end to end (seq_idx per batch row): boundaries inside chunks and on their edges,
# one-step sequences, a row that is one sequence; each a run with a number of its own.
SEQUENCES = {
    "inside chunks": [[0] * 5 + [1] + [2] * 13 + [3] * 18, [0] * 37],
    "on chunk edges": [[0] * 8 + [1] * 8 + [2] * 16 + [3] * 5, [0] * 3 + [1] * 29 + [2] * 5],
    "one step each": [list(range(37)), [0] * 36 + [1]],
}


def seq_idx_of(name):
    return torch.tensor(SEQUENCES[name], dtype=torch.int32)


def each_sequence_alone(fn, inputs, seq_idx, **kwargs):
    """``fn`` on each sequence of each row of ``seq_idx`` alone, put back in place: [b l ...]."""
    rows = []
    for b in range(seq_idx.shape[0]):
        parts = []
        for s in seq_idx[b].unique():
            steps = seq_idx[b] == s
            alone = {k: v[b:b + 1][:, steps] if v is not None and v.dim() > 1 else v
                     for k, v in inputs.items()}
            parts.append(fn(**alone, **kwargs))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("sequences", SEQUENCES)
@pytest.mark.parametrize("chunk_size", [4, 8, 64])
def test_chunked_scan_with_seq_idx_scans_each_sequence_alone(sequences, chunk_size):
    """``seq_idx``: nothing passes from one sequence to the next. The recurrence with it equals
    each sequence scanned alone; the chunked scan (values and gradients) equals the recurrence."""
    seq_idx = seq_idx_of(sequences)
    inputs = random_inputs(2, 37, 4, 5, 2, 6, seed=11)
    y_ref, g_ref = outputs_and_grads(ssd.ssd_recurrence, inputs, dt_softplus=True,
                                     seq_idx=seq_idx)
    alone = each_sequence_alone(ssd.ssd_recurrence, inputs, seq_idx, dt_softplus=True)
    assert rel_err(y_ref, alone) < 1e-12
    assert rel_err(y_ref, ssd.ssd_recurrence(**inputs, dt_softplus=True)) > 1e-3  # it matters
    y, g = outputs_and_grads(ssd.chunk_scan_torch, inputs, chunk_size=chunk_size,
                             dt_softplus=True, seq_idx=seq_idx)
    assert rel_err(y, y_ref) < 1e-10
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-10, name


@pytest.mark.parametrize("sequences", SEQUENCES)
@pytest.mark.parametrize("conv", [conv_masked, conv_less_crossings])
def test_causal_conv_with_seq_idx_convolves_each_sequence_alone(conv, sequences):
    """Both ways of keeping the convolution within each sequence: the values and gradients of
    convolving each sequence alone."""
    seq_idx = seq_idx_of(sequences)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 6, generator=g, dtype=F64, requires_grad=True)  # [B L C]
    weight = torch.randn(6, 1, 4, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    dout = torch.randn(2, 37, 6, generator=g, dtype=F64)
    out = conv(x.transpose(1, 2), weight, bias, seq_idx).transpose(1, 2)  # seen as [B C L]
    alone = each_sequence_alone(
        lambda x: causal_conv1d(x.transpose(1, 2), weight, bias).transpose(1, 2),
        {"x": x}, seq_idx)
    assert torch.allclose(out, alone, rtol=1e-13, atol=1e-13)
    for grad, ref in zip(torch.autograd.grad(out, (x, weight, bias), dout),
                         torch.autograd.grad(alone, (x, weight, bias), dout)):
        assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-12)


def test_packing_lays_real_positions_end_to_end_in_rows():
    lengths = torch.tensor([3, 1, 4])
    packing = Packing.of(lengths, seqlen=5, size=10)  # one row of 10 + 4 slots
    assert packing.rows.tolist() == [0, 1, 2, 5, 10, 11, 12, 13] + [0] * 6  # [B*L] rows
    assert packing.seq_idx.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2] + [3] * 6]  # filler: B
    assert packing.last.tolist() == [2, 3, 7]
    x = torch.arange(15.0).view(3, 5)
    assert packing.pack(x).tolist() == [[0, 1, 2, 5, 10, 11, 12, 13] + [0] * 6]
    exact = Packing.of(lengths, seqlen=5, size=8)  # 8 slots, and 4 for one that runs over
    assert exact.rows.tolist() == packing.rows[:12].tolist() and exact.seq_idx.shape == (1, 12)

    # two rows of 5 nominal slots: the second sequence starts in row 0 and runs into its extra
    # slots; the third starts in row 1 (stream position 7, slot 2 of that row)
    lengths = torch.tensor([3, 4, 2])
    packing = Packing.of(lengths, seqlen=5, size=9, row_slots=5)
    assert packing.seq_idx.tolist() == [[0, 0, 0, 1, 1, 1, 1, 3, 3], [3, 3, 2, 2] + [3] * 5]
    assert packing.rows.tolist() == [0, 1, 2, 5, 6, 7, 8, 0, 0, 0, 0, 10, 11] + [0] * 5
    assert packing.last.tolist() == [2, 6, 12]


def test_recurrence_matches_hand_computed_single_step():
    # One head, one channel, one state: y_1 = C_1 * (delta_1 x_1 B_1) + D x_1,
    # delta = softplus(dt + bias).
    x, dt, B, C = (torch.tensor(v, dtype=F64).reshape(1, 1, 1, 1) for v in (2.0, 0.3, 1.5, -0.5))
    delta = torch.log1p(torch.exp(torch.tensor(0.3 + 0.2, dtype=F64)))
    y = ssd.ssd_recurrence(x, dt[..., 0], torch.tensor([-1.0], dtype=F64), B, C,
                           D=torch.tensor([0.7], dtype=F64), dt_bias=torch.tensor([0.2], dtype=F64),
                           dt_softplus=True)
    assert y.item() == pytest.approx((-0.5 * delta * 2.0 * 1.5 + 0.7 * 2.0).item(), rel=1e-14)


def test_padding_never_changes_real_positions():
    inputs = random_inputs(2, 13, 2, 3, 1, 4, seed=5)
    full = ssd.chunk_scan_torch(**inputs, chunk_size=8, dt_softplus=True)
    cut = {k: (v[:, :9] if v.dim() > 1 else v) for k, v in inputs.items()}
    part = ssd.chunk_scan_torch(**cut, chunk_size=8, dt_softplus=True)
    assert torch.allclose(full[:, :9], part, rtol=0, atol=1e-12)


def test_float32_inputs_give_float32_output_close_to_float64():
    inputs = random_inputs(2, 40, 4, 8, 1, 16, seed=7)
    y64 = ssd.chunk_scan_torch(**inputs, chunk_size=16, dt_softplus=True)
    y32 = ssd.chunk_scan_torch(**{k: v.detach().float() for k, v in inputs.items()},
                               chunk_size=16, dt_softplus=True)
    assert y32.dtype == torch.float32
    assert rel_err(y32.double(), y64) < 1e-5


def test_dispatch_torch_and_unknown_backend():
    inputs = random_inputs(1, 9, 2, 2, 1, 2)
    y = ssd.chunk_scan(**inputs, chunk_size=4, dt_softplus=True, backend="torch")
    assert torch.equal(y, ssd.chunk_scan_torch(**inputs, chunk_size=4, dt_softplus=True))
    assert torch.equal(ssd.chunk_scan(**inputs, chunk_size=4, dt_softplus=True), y)  # auto on CPU
    with pytest.raises(ValueError, match="backend"):
        ssd.chunk_scan(**inputs, chunk_size=4, backend="cuda")


def test_resolve_backend_never_silent_on_cpu():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="triton cannot run"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="ssd_backend"):
        resolve_backend("fast", "cpu")


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rmsnorm_reference(norm_before_gate):
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(3, 5, 16, generator=g, dtype=F64),
            torch.randn(3, 5, 16, generator=g, dtype=F64))
    w = torch.randn(16, generator=g, dtype=F64)
    gate = z * torch.sigmoid(z)
    v = x if norm_before_gate else x * gate
    expected = v / torch.sqrt((v ** 2).sum(-1, keepdim=True) / 16 + 1e-6) * w
    expected = expected * gate if norm_before_gate else expected
    out = gated_rmsnorm_ref(x, z, w, 1e-6, norm_before_gate)
    assert torch.allclose(out, expected, rtol=1e-13, atol=0)
    module = ssd.GatedRMSNorm(16, eps=1e-6, norm_before_gate=norm_before_gate).double()
    module.weight.data.copy_(w)
    assert torch.allclose(module(x, z), expected, rtol=1e-13, atol=0)


def test_causal_conv_sees_only_the_past():
    conv = ssd.CausalConv1d(3, 4).double()
    x = torch.randn(2, 3, 10, dtype=F64)
    y = conv(x)
    x2 = x.clone()
    x2[..., 6:] = torch.randn(2, 3, 4, dtype=F64)
    assert y.shape == x.shape
    assert torch.equal(conv(x2)[..., :6], y[..., :6])
    assert not torch.allclose(conv(x2)[..., 6:], y[..., 6:])


def test_causal_conv_channels_last_path_equals_conv1d():
    """A [B L C] tensor seen as [B C L] takes the 2-D channels-last path on the CPU: same values
    and gradients as the plain Conv1d on a contiguous copy."""
    conv = ssd.CausalConv1d(6, 4).double()
    data = torch.randn(3, 11, 6, dtype=F64)
    x_last = data.clone().requires_grad_(True)
    x_first = data.transpose(1, 2).contiguous().requires_grad_(True)
    y_last, y_first = conv(x_last.transpose(1, 2)), conv(x_first)  # [B C L] both
    assert x_last.transpose(1, 2).stride(1) == 1 and x_first.stride(1) != 1  # the two paths
    weights = torch.randn(y_first.shape, dtype=F64)
    grads_last = torch.autograd.grad((y_last * weights).sum(), [x_last, conv.weight, conv.bias])
    grads_first = torch.autograd.grad((y_first * weights).sum(), [x_first, conv.weight, conv.bias])
    reference = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x_first, (3, 0)), conv.weight, conv.bias, groups=6)
    assert torch.allclose(y_first, reference, rtol=1e-13, atol=1e-13)
    assert torch.allclose(y_last, y_first, rtol=1e-13, atol=1e-13)
    assert torch.allclose(grads_last[0], grads_first[0].transpose(1, 2), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_last[1:], grads_first[1:]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_block_projection_and_whole_sequence_chunk_change_nothing(monkeypatch):
    """The CPU shortcuts of TimeAwareSSD: in_proj as three products, and a short sequence as one
    scan chunk. Same output and gradients as one product split in three and chunks of 4."""
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=4,
                             backend="torch").double()
    u = torch.randn(3, 12, 16, dtype=F64)
    tau = torch.randn(3, block.nheads, 12, dtype=F64)
    assert block.scan_chunk_size(u) == 12
    z, xBC, dt = block.project_in(u)
    assert all(p.is_contiguous() for p in (z, xBC, dt))
    split = torch.split(block.in_proj(u), [32, 32 + 16, block.nheads], dim=-1)
    for a, b in zip((z, xBC, dt), split):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)

    def run():
        block.zero_grad()
        out, tau_next = block(u, tau)
        (out.square().sum() + tau_next.sum()).backward()
        return out, [p.grad.clone() for p in block.parameters() if p.grad is not None]

    fast_out, fast_grads = run()
    monkeypatch.setattr(ssd, "WHOLE_SEQUENCE_CHUNK", 0)  # chunks of chunk_size = 4
    monkeypatch.setattr(block, "project_in",
                        lambda x, at: torch.split(block.in_proj(x), [32, 48, block.nheads], dim=-1))
    assert block.scan_chunk_size(u) == 4
    plain_out, plain_grads = run()
    assert torch.allclose(fast_out, plain_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(fast_grads, plain_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def block_outputs_and_grads(block, u, tau, run):
    """Output, every parameter's gradient and those of ``u`` and ``tau`` after one backward."""
    block.zero_grad()
    inputs = [t for t in (u, tau) if t is not None]
    for t in inputs:
        t.grad = None
    out, tau_next = run(u, tau)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    loss = (out * weights).sum() + (tau_next.square().sum() if tau_next is not None else 0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    grads.update({f"input {i}": t.grad.clone() for i, t in enumerate(inputs)})
    return out.detach(), grads


@pytest.mark.parametrize("is_time,bias,chunk_size", [
    (True, True, 4), (True, False, 16), (False, True, 4), (False, False, 8)])
def test_fused_block_equals_the_module_path(is_time, bias, chunk_size):
    """FusedSSDBlock (one autograd node, recomputing in backward) with the PyTorch kernels: the
    module path's output and every gradient, in float64."""
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=chunk_size,
                             is_time=is_time, bias=bias, backend="torch").double()
    for p in block.parameters():  # off the initial values (ones, zeros) that could hide a slip
        p.data.add_(torch.randn_like(p), alpha=0.1)
    u = torch.randn(3, 12, 16, dtype=F64, requires_grad=True)
    tau = torch.randn(3, block.nheads, 12, dtype=F64, requires_grad=True) if is_time else None
    block.eval()  # no dropout in the time branch: both runs see the same values
    plain_out, plain = block_outputs_and_grads(block, u, tau, block)
    fused_out, fused = block_outputs_and_grads(
        block, u, tau, lambda u, tau: block.forward_fused(u, tau, torch_block_kernels()))
    assert torch.allclose(fused_out, plain_out, rtol=1e-12, atol=1e-13)
    assert fused.keys() == plain.keys() and len(plain) == sum(
        p.requires_grad for p in block.parameters()) + (2 if is_time else 1)
    for name in plain:
        assert torch.allclose(fused[name], plain[name], rtol=1e-10, atol=1e-12), name


def read_at(run, at):
    """``run`` (a block's forward) computing every position, its output read at ``at``."""
    def read(u, tau):
        out, tau_next = run(u, tau)
        return at_positions(out, at), tau_next
    return read


@pytest.mark.parametrize("path", ["modules", "fused node"])
@pytest.mark.parametrize("is_time,bias", [(True, True), (False, False)])
def test_block_output_at_positions_equals_every_position_read_there(path, is_time, bias):
    """``at``: the output at one position per sequence, with z's part of in_proj, the gated norm
    and out_proj computed there only: the values and every gradient of computing every position
    and reading those, in float64."""
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=4,
                             is_time=is_time, bias=bias, backend="torch").double().eval()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.1)
    u = torch.randn(3, 12, 16, dtype=F64, requires_grad=True)
    tau = torch.randn(3, block.nheads, 12, dtype=F64, requires_grad=True) if is_time else None
    at = torch.tensor([11, 0, 5])

    def run(u, tau, at=None):
        if path == "modules":
            return block(u, tau, at)
        return block.forward_fused(u, tau, torch_block_kernels(), at)

    every_out, every = block_outputs_and_grads(block, u, tau, read_at(run, at))
    at_out, at_grads = block_outputs_and_grads(block, u, tau, lambda u, tau: run(u, tau, at))
    assert at_out.shape == (3, 16)
    assert torch.allclose(at_out, every_out, rtol=1e-12, atol=1e-13)
    assert at_grads.keys() == every.keys()
    for name in every:
        assert torch.allclose(at_grads[name], every[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("path", ["modules", "fused node"])
@pytest.mark.parametrize("is_time,bias,with_at", [(True, True, False), (True, False, True),
                                                  (False, True, True)])
def test_packed_block_equals_the_padded_block_at_real_positions(path, is_time, bias, with_at):
    """``packing``: the batch's real positions laid end to end, with filler slots after them.
    At every real position (or, ``with_at``, at each sequence's last), the output and every
    gradient (weights, u, tau) of the padded batch, in float64."""
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=4,
                             is_time=is_time, bias=bias, backend="torch").double().eval()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.1)
    lengths = torch.tensor([12, 1, 5, 9])
    packing = Packing.of(lengths, 12, size=32, row_slots=10)  # 27 real positions, 4 rows
    u = torch.randn(4, 12, 16, dtype=F64, requires_grad=True)
    tau = torch.randn(4, block.nheads, 12, dtype=F64, requires_grad=True) if is_time else None
    real = packing.seq_idx.flatten() < 4

    def run(u, tau, packing=None, at=None):
        if path == "modules":
            return block(u, tau, at, packing)
        return block.forward_fused(u, tau, torch_block_kernels(), at, packing)

    def padded(u, tau):
        out, tau_next = run(u, tau)
        out = packing.pack(out)[:, real] if not with_at else at_positions(out, lengths - 1)
        return out, tau_next

    def packed(u, tau):
        out, tau_next = run(packing.pack(u), tau, packing, packing.last if with_at else None)
        return (out if with_at else out[:, real]), tau_next

    padded_out, padded_grads = block_outputs_and_grads(block, u, tau, padded)
    packed_out, packed_grads = block_outputs_and_grads(block, u, tau, packed)
    assert packed_out.shape == ((4, 16) if with_at else (1, 27, 16))
    assert torch.allclose(packed_out, padded_out, rtol=1e-12, atol=1e-13)
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        assert torch.allclose(packed_grads[name], padded_grads[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("kwargs,message", [
    (dict(head_dim=48), "head_dim"),
    (dict(chunk_size=24), "power of two"),
    (dict(conv_activation="gelu"), "conv_activation"),
])
def test_block_rejects_bad_shapes_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ssd.TimeAwareSSD(64, 50, **kwargs)


# ---------------------------------------------------------------------------------- GPU (Triton)

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or triton_unavailable_reason() is not None,
    reason="needs CUDA and mamba-ssm's Triton kernels")


@cuda
@pytest.mark.parametrize("seqlen,chunk_size,nheads,headdim,dstate", [
    (50, 32, 4, 32, 32), (200, 32, 4, 32, 32), (200, 32, 4, 128, 64), (37, 16, 2, 16, 8)])
def test_triton_scan_matches_torch_path_float32(seqlen, chunk_size, nheads, headdim, dstate):
    inputs = random_inputs(8, seqlen, nheads, headdim, 1, dstate, dtype=torch.float32,
                           device="cuda", seed=seqlen)
    y_t, g_t = outputs_and_grads(ssd.chunk_scan, inputs, chunk_size=chunk_size, dt_softplus=True,
                                 backend="triton")
    inputs64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    y_r, g_r = outputs_and_grads(ssd.chunk_scan_torch, inputs64, chunk_size=chunk_size,
                                 dt_softplus=True)
    # mamba-ssm's kernels multiply float32 matrices in TF32 (10-bit mantissa): ~1e-3, not ~1e-6.
    errors = {"y": rel_err(y_t.double(), y_r)}
    errors.update({name: rel_err(g_t[name].double(), g_r[name]) for name in g_r})
    print(f"L={seqlen} Q={chunk_size} H={nheads} P={headdim} N={dstate}:", errors)
    assert all(err < 5e-3 for err in errors.values()), errors


@cuda
def test_triton_gated_rmsnorm_matches_reference():
    x, z = torch.randn(2, 50, 128, device="cuda"), torch.randn(2, 50, 128, device="cuda")
    module = ssd.GatedRMSNorm(128, eps=1e-12, backend="triton").cuda()
    module.weight.data.normal_()
    ref = gated_rmsnorm_ref(x.double(), z.double(), module.weight.double(), 1e-12)
    assert rel_err(module(x, z).double(), ref) < 1e-5


@cuda
@pytest.mark.parametrize("is_time,hidden,head_dim,d_state,with_at", [
    (True, 64, 32, 32, False), (False, 64, 32, 32, False), (False, 256, 128, 64, False),
    (True, 64, 32, 32, True), (False, 256, 128, 64, True)])
def test_fused_block_with_triton_kernels_matches_module_path(is_time, hidden, head_dim, d_state,
                                                             with_at):
    """On the GPU: the fused node with mamba-ssm's forward and backward functions against the same
    block as separate modules (the same kernels through their autograd functions), float32;
    ``with_at``: the node's output at one position per sequence against the modules' output at
    every position, read there."""
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(hidden, max_seq_length=200, d_state=d_state, head_dim=head_dim,
                             is_time=is_time, backend="triton").cuda().eval()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.05)
    u = torch.randn(16, 200, hidden, device="cuda", requires_grad=True)
    tau = torch.randn(16, block.nheads, 200, device="cuda", requires_grad=True) if is_time else None
    at = torch.randint(0, 200, (16,), device="cuda") if with_at else None
    block.fused = False
    plain_out, plain = block_outputs_and_grads(block, u, tau, read_at(block, at) if with_at
                                               else block)
    block.fused = True
    fused_out, fused = block_outputs_and_grads(block, u, tau, lambda u, tau: block(u, tau, at))
    assert rel_err(fused_out, plain_out) < 1e-5
    errors = {name: rel_err(fused[name], plain[name]) for name in plain}
    print(errors)
    assert fused.keys() == plain.keys()
    assert all(err < 1e-4 for err in errors.values()), errors


@cuda
@pytest.mark.parametrize("fused,is_time,hidden,head_dim,d_state,with_at", [
    (True, True, 64, 32, 32, True), (True, True, 64, 32, 32, False),
    (True, False, 256, 128, 64, True), (False, True, 64, 32, 32, True)])
def test_packed_triton_block_matches_the_padded_modules(fused, is_time, hidden, head_dim,
                                                        d_state, with_at):
    """On the GPU: the block on packed real positions (mamba-ssm's scan with ``seq_idx``, this
    project's convolution with it; ``fused``: as one node) against the padded block as separate
    modules, at the real positions (or, ``with_at``, each sequence's last), float32."""
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(hidden, max_seq_length=200, d_state=d_state, head_dim=head_dim,
                             is_time=is_time, backend="triton").cuda().eval()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.05)
    lengths = torch.randint(1, 201, (16,), device="cuda")
    lengths[0] = 200
    packing = Packing.of(lengths, 200, size=int(lengths.sum()) + 100)
    real = packing.seq_idx.flatten() < 16
    u = torch.randn(16, 200, hidden, device="cuda", requires_grad=True)
    tau = torch.randn(16, block.nheads, 200, device="cuda", requires_grad=True) if is_time else None

    def padded(u, tau):
        out, tau_next = block(u, tau)
        out = at_positions(out, lengths - 1) if with_at else packing.pack(out)[:, real]
        return out, tau_next

    def packed(u, tau):
        out, tau_next = block(packing.pack(u), tau, packing.last if with_at else None, packing)
        return (out if with_at else out[:, real]), tau_next

    block.fused = False
    padded_out, padded_grads = block_outputs_and_grads(block, u, tau, padded)
    block.fused = fused
    packed_out, packed_grads = block_outputs_and_grads(block, u, tau, packed)
    # The two layouts put other steps in each chunk of mamba-ssm's scan, which multiplies in
    # TF32: the rounding differs, as against the float64 reference (test above).
    errors = {"out": rel_err(packed_out, padded_out)}
    errors.update({name: rel_err(packed_grads[name], padded_grads[name])
                   for name in padded_grads})
    print(errors)
    assert packed_grads.keys() == padded_grads.keys()
    assert all(err < 5e-3 for err in errors.values()), errors
