"""The baselines: every one builds on a tiny dataset, trains a step and ranks all items; and the
numerics each plugin model rests on (TiSASRec's intervals and attention, LRURec's scan, Mamba4Rec's
backends, SSD4Rec's two directions and its padding)."""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from baseline.Mamba4Rec import mamba_block as mamba_blocks
from pipeline import compat

ROOT = Path(__file__).resolve().parents[1]
BASELINE_DIR = ROOT / "baseline"
PLUGINS = ("TiSASRec", "LRURec", "Mamba4Rec", "SSD4Rec")


def load_baseline(name: str):
    """``baseline/<name>/model.py`` as a module, under the name the project's registry gives it."""
    module_name = f"baseline_{name.lower()}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BASELINE_DIR / name / "model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def requires(name: str) -> None:
    """Skip ``name`` where a package it needs is missing. Every baseline runs on requirements.txt
    alone now (Mamba4Rec no longer needs mambapy); kept for the tests that call it per model."""


_BUILT: dict = {}


def build(name: str, data_path: Path, checkpoint_dir: Path, **overrides):
    """(model, train_data, test_data) of ``name`` on the dataset ``tiny``, cached per setting."""
    key = (name, tuple(sorted(overrides.items())))
    if key in _BUILT:
        return _BUILT[key]
    compat.apply()
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, init_seed

    model_class = load_baseline(name).__dict__[name] if name in PLUGINS else get_model(name)
    config = Config(
        model=model_class,
        dataset="tiny",
        config_file_list=[str(BASELINE_DIR / name / "config.yaml")],
        config_dict={
            "data_path": str(data_path),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "train_neg_sample_args": None,
            "MAX_ITEM_LIST_LENGTH": 10,
            "epochs": 1,
            "use_gpu": False,
            "user_inter_num_interval": "[5,inf)",
            "item_inter_num_interval": "[5,inf)",
            "train_batch_size": 32,
            "eval_batch_size": 64,
            "show_progress": False,
            "checkpoint_dir": str(checkpoint_dir),
            "state": "WARNING",
            **overrides,
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    model = model_class(config, train_data._dataset)
    _BUILT[key] = (model, train_data, test_data)
    return _BUILT[key]


@pytest.fixture
def make(tiny_data_path, tmp_path_factory):
    def _make(name, **overrides):
        requires(name)
        return build(name, tiny_data_path, tmp_path_factory.mktemp("saved"), **overrides)

    return _make


def train_step_and_rank(model, train_data, test_data):
    model.train()
    model.zero_grad()
    loss = model.calculate_loss(next(iter(train_data)))
    assert torch.isfinite(loss), loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    batch = next(iter(test_data))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
    assert scores.shape == (len(batch), model.n_items)
    assert torch.isfinite(scores).all()


# ------------------------------------------------------------------------------------------------
# Every baseline builds, trains a step and ranks all items
# ------------------------------------------------------------------------------------------------

# Values that differ from RecBole's own defaults: read back, they prove the file's keys are used.
BUILTIN_SETTINGS = {
    "SASRec": {"n_heads": 8, "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "n_layers": 2},
    "BERT4Rec": {
        "n_heads": 2,
        "hidden_dropout_prob": 0.4,
        "attn_dropout_prob": 0.4,
        "mask_ratio": 0.2,
    },
    "GRU4Rec": {"embedding_size": 64, "hidden_size": 128, "num_layers": 2, "dropout_prob": 0.4},
    "Caser": {"n_v": 4, "n_h": 8, "reg_weight": 1e-4, "dropout_prob": 0.2},
}


@pytest.mark.parametrize("name", sorted(BUILTIN_SETTINGS))
def test_recbole_builtin_reads_its_settings_and_trains(make, name):
    model, train_data, test_data = make(name)
    for attribute, value in BUILTIN_SETTINGS[name].items():
        assert getattr(model, attribute) == value, attribute
    assert model.loss_type == "CE"
    train_step_and_rank(model, train_data, test_data)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("TiSASRec", {}),
        ("TiSASRec", {"interval_mode": "raw"}),
        ("LRURec", {}),
        ("Mamba4Rec", {}),
        ("SSD4Rec", {}),
        ("SSD4Rec", {"bidirectional": False}),
    ],
    ids=["TiSASRec", "TiSASRec-raw", "LRURec", "Mamba4Rec", "SSD4Rec", "SSD4Rec-one-direction"],
)
def test_plugin_model_trains_and_ranks(make, name, overrides):
    model, train_data, test_data = make(name, **overrides)
    train_step_and_rank(model, train_data, test_data)


def with_noisy_padding(model, batch, seed=0):
    """A copy of ``batch`` whose padded slots hold random items (and random times)."""
    generator = torch.Generator().manual_seed(seed)
    noisy = batch.__class__({key: batch[key].clone() for key in batch.columns})
    item_seq, lengths = noisy[model.ITEM_SEQ], noisy[model.ITEM_SEQ_LEN]
    padded = torch.arange(item_seq.size(1)) >= lengths.unsqueeze(1)  # [B L]
    assert padded.any(), "the test batch needs some padding"
    junk = torch.randint(1, model.n_items, item_seq.shape, generator=generator)
    noisy[model.ITEM_SEQ] = torch.where(padded, junk, item_seq)
    times = noisy["timestamp_list"]
    noisy["timestamp_list"] = torch.where(
        padded, torch.rand(times.shape, generator=generator) * 2e9, times
    )
    return noisy


@pytest.mark.parametrize("name", PLUGINS)
def test_padded_slots_do_not_change_the_ranking(make, name):
    model, _, test_data = make(name)
    model.eval()
    batch = next(iter(test_data))[0]
    batch = batch[batch[model.ITEM_SEQ_LEN] < model.max_seq_length]
    with torch.no_grad():
        clean = model.full_sort_predict(batch)
        noisy = model.full_sort_predict(with_noisy_padding(model, batch))
    torch.testing.assert_close(noisy, clean, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# TiSASRec
# ------------------------------------------------------------------------------------------------

# Row 0: gaps 60, 0, 90, 150 -> r_min 60; |t_i - t_j| / 60 = 1, 2.5, 5, 1.5, 4, ... floored and
# clipped.
# Row 1: one item. Row 2: two items (gap 3), padded slots hold junk. Row 3: Unix-scale float32
# times, gaps 128 and 256.
TIMES = torch.tensor(
    [
        [100.0, 160.0, 160.0, 250.0, 400.0],
        [50.0, 0.0, 0.0, 0.0, 0.0],
        [10.0, 13.0, 999.0, 5.0, 0.0],
        [1e9, 1e9 + 128, 1e9 + 384, 0.0, 0.0],
    ],
    dtype=torch.float32,
)
LENGTHS = torch.tensor([5, 1, 2, 3])


def padded(rows, size=5):
    out = torch.zeros(size, size, dtype=torch.long)
    rows = torch.tensor(rows)
    out[: rows.size(0), : rows.size(1)] = rows
    return out


# The interval matrices of TIMES and LENGTHS, worked by hand: one per sequence, its real part.
HAND_WORKED_INTERVALS = {
    ("personalized", 4): [
        [[0, 1, 1, 2, 4], [1, 0, 0, 1, 4], [1, 0, 0, 1, 4], [2, 1, 1, 0, 2], [4, 4, 4, 2, 0]],
        [[0]], [[0, 1], [1, 0]], [[0, 1, 3], [1, 0, 2], [3, 2, 0]]],
    ("raw", 200): [
        [[0, 60, 60, 150, 200], [60, 0, 0, 90, 200], [60, 0, 0, 90, 200], [150, 90, 90, 0, 150],
         [200, 200, 200, 150, 0]],
        [[0]], [[0, 3], [3, 0]], [[0, 128, 200], [128, 0, 200], [200, 200, 0]]],
}


@pytest.mark.parametrize("mode, time_span", list(HAND_WORKED_INTERVALS),
                         ids=[mode for mode, _ in HAND_WORKED_INTERVALS])
def test_tisasrec_intervals_hand_worked(mode, time_span):
    interval_matrix = load_baseline("TiSASRec").interval_matrix
    expected = torch.stack([padded(rows) for rows in HAND_WORKED_INTERVALS[mode, time_span]])
    got = interval_matrix(TIMES, LENGTHS, time_span=time_span, mode=mode)
    assert got.dtype == torch.long
    torch.testing.assert_close(got, expected)


def test_tisasrec_interval_mode_is_validated():
    interval_matrix = load_baseline("TiSASRec").interval_matrix
    with pytest.raises(ValueError, match="interval mode"):
        interval_matrix(TIMES, LENGTHS, time_span=4, mode="seconds")


def test_tisasrec_factored_interval_attention_equals_per_pair_form():
    """Evaluation's gather/scatter form computes exactly what training's [B L L D] form does."""
    module = load_baseline("TiSASRec")
    torch.manual_seed(0)
    batch, length, hidden, heads, span = 3, 7, 8, 2, 5
    attention = module.TimeIntervalAttention(hidden, heads, attn_dropout_prob=0.0).double().eval()
    x, keys, pos_k, pos_v = (
        torch.randn(batch, length, hidden, dtype=torch.float64) for _ in range(4)
    )
    table_k, table_v = (torch.randn(span + 1, hidden, dtype=torch.float64) for _ in range(2))
    intervals = torch.randint(0, span + 1, (batch, length, length))
    lengths = torch.tensor([7, 4, 1])
    real = torch.arange(length) < lengths.unsqueeze(1)
    attend = (torch.ones(length, length, dtype=torch.bool).tril() & real.unsqueeze(1)).unsqueeze(1)

    factored = attention(x, keys, pos_k, pos_v, intervals, table_k, table_v, attend)
    per_pair = attention(
        x, keys, pos_k, pos_v, intervals, table_k[intervals], table_v[intervals], attend
    )
    torch.testing.assert_close(factored, per_pair, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# LRURec
# ------------------------------------------------------------------------------------------------


def lru_recurrence(lam, inputs):
    """h_t = lam * h_{t-1} + inputs_t, one step after the other."""
    state = torch.zeros_like(inputs[..., 0, :])
    states = []
    for t in range(inputs.size(-2)):
        state = lam * state + inputs[..., t, :]
        states.append(state)
    return torch.stack(states, dim=-2)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 13, 50])
def test_lru_parallel_scan_matches_recurrence(length):
    scan = load_baseline("LRURec").lru_parallel_scan
    generator = torch.Generator().manual_seed(length)
    n_states = 6
    modulus = 0.5 + 0.49 * torch.rand(n_states, dtype=torch.float64, generator=generator)
    phase = 2 * math.pi * torch.rand(n_states, dtype=torch.float64, generator=generator)
    lam = torch.polar(modulus, phase).requires_grad_()
    inputs = torch.complex(
        torch.randn(2, length, n_states, dtype=torch.float64, generator=generator),
        torch.randn(2, length, n_states, dtype=torch.float64, generator=generator),
    ).requires_grad_()
    weight = torch.randn(2, length, n_states, dtype=torch.float64, generator=generator)

    def run(fn):
        states = fn(lam, inputs)
        # A one-step scan never touches lam: its gradient is then zero, as the recurrence's.
        (grad_lam, grad_inputs) = torch.autograd.grad(
            (states.real * weight + states.imag * weight.flip(-1)).sum(),
            (lam, inputs),
            allow_unused=True,
            materialize_grads=True,
        )
        return states, grad_lam, grad_inputs

    for fast, slow in zip(run(scan), run(lru_recurrence)):
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_lru_ring_init_law():
    module = load_baseline("LRURec")
    torch.manual_seed(0)
    nu_log, theta_log, gamma_log = module.ring_init(4096, r_min=0.8, r_max=0.99)
    modulus = torch.exp(-torch.exp(nu_log))
    phase = torch.exp(theta_log)
    assert modulus.min() >= 0.8 - 1e-6 and modulus.max() <= 0.99 + 1e-6
    assert phase.min() >= 0 and phase.max() <= 2 * math.pi
    torch.testing.assert_close(torch.exp(gamma_log), torch.sqrt(1 - modulus**2))
    # Uniform on the ring's area: |lambda|^2 is uniform on [r_min^2, r_max^2].
    assert abs((modulus**2).mean().item() - (0.8**2 + 0.99**2) / 2) < 0.01


def test_lru_left_padding():
    to_left_padding = load_baseline("LRURec").to_left_padding
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 0, 9]])
    torch.testing.assert_close(to_left_padding(seq, torch.tensor([3, 5, 1])), expected)


# ------------------------------------------------------------------------------------------------
# Mamba4Rec
# ------------------------------------------------------------------------------------------------


def test_mamba_backend_selection_is_explicit(caplog, monkeypatch):
    module = load_baseline("Mamba4Rec")
    with caplog.at_level(logging.INFO):
        assert module.select_backend("auto", "cpu") == "torch"
    # the PyTorch scan is the CPU's own path: said, not warned about
    assert any("PyTorch selective scan" in r.getMessage() and "needs CUDA" in r.getMessage()
               for r in caplog.records)
    assert all(r.levelno < logging.WARNING for r in caplog.records)
    assert module.select_backend("torch", "cpu") == "torch"
    for backend in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match=f"'{backend}' was requested but .* needs CUDA"):
            module.select_backend(backend, "cpu")
    with pytest.raises(ValueError, match="mamba_backend"):
        module.select_backend("mambapy", "cpu")

    # On CUDA: mamba-ssm's compiled scan first, then the Triton scan, then (warned) PyTorch's.
    monkeypatch.setattr(module, "cuda_backend_problem", lambda device: "no compiled mamba-ssm")
    monkeypatch.setattr(module, "triton_backend_problem", lambda device: None)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert module.select_backend("auto", "cuda") == "triton"
    assert any("no compiled mamba-ssm" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(module, "triton_backend_problem", lambda device: "no Triton")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert module.select_backend("auto", "cuda") == "torch"
    assert any(r.levelno == logging.WARNING and "no Triton" in r.getMessage()
               for r in caplog.records)
    monkeypatch.setattr(module, "cuda_backend_problem", lambda device: None)
    assert module.select_backend("auto", "cuda") == "cuda"


def mamba_reference(block, u):
    """Mamba-1 (mamba-ssm's ``Mamba.forward`` maths), one step after the other, from the block's
    parameters read by mamba-ssm's names."""
    d_inner, d_state = block.A_log.shape
    dt_rank = block.dt_proj.weight.shape[1]
    length = u.size(1)
    x, z = block.in_proj(u).chunk(2, dim=-1)  # [B L E]
    kernel = block.conv1d.weight.shape[-1]
    x = F.conv1d(
        F.pad(x.transpose(1, 2), (kernel - 1, 0)),
        block.conv1d.weight,
        block.conv1d.bias,
        groups=d_inner,
    )
    x = F.silu(x).transpose(1, 2)  # [B L E]
    dt, B, C = block.x_proj(x).split([dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus(block.dt_proj(dt))  # [B L E]
    A = -torch.exp(block.A_log)  # [E N]
    state = u.new_zeros(u.size(0), d_inner, d_state)
    ys = []
    for t in range(length):
        state = (
            torch.exp(delta[:, t, :, None] * A) * state
            + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        )
        ys.append((state * C[:, t, None, :]).sum(-1) + block.D * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return block.out_proj(y)


MAMBA_SSM_SHAPES = {  # mamba_ssm.modules.mamba_simple.Mamba (bias=False, conv_bias=True)
    "in_proj.weight": lambda d, e, n, k, r: (2 * e, d),
    "conv1d.weight": lambda d, e, n, k, r: (e, 1, k),
    "conv1d.bias": lambda d, e, n, k, r: (e,),
    "x_proj.weight": lambda d, e, n, k, r: (r + 2 * n, e),
    "dt_proj.weight": lambda d, e, n, k, r: (e, r),
    "dt_proj.bias": lambda d, e, n, k, r: (e,),
    "A_log": lambda d, e, n, k, r: (e, n),
    "D": lambda d, e, n, k, r: (e,),
    "out_proj.weight": lambda d, e, n, k, r: (d, e),
}


@pytest.mark.parametrize("d_model, d_state", [(16, 8), (40, 32)])
def test_mamba_block_has_mamba_ssm_keys_init_and_maths(d_model, d_state):
    torch.manual_seed(0)
    d_conv, expand = 4, 2
    block = mamba_blocks.MambaBlock(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    expected = {key: shape(d_model, d_inner, d_state, d_conv, dt_rank)
                for key, shape in MAMBA_SSM_SHAPES.items()}
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == expected
    # mamba-ssm's init: S4D-real A, unit skip, dt_proj's weight within +-dt_rank^-1/2, its bias the
    # inverse softplus of steps in [dt_min, dt_max] = [0.001, 0.1]
    torch.testing.assert_close(block.A_log,
                               torch.log(torch.arange(1.0, d_state + 1)).repeat(d_inner, 1))
    assert torch.equal(block.D, torch.ones(d_inner))
    assert block.dt_proj.weight.abs().max() <= dt_rank**-0.5
    steps = F.softplus(block.dt_proj.bias)
    assert 0.001 - 1e-6 <= steps.min() and steps.max() <= 0.1 + 1e-6
    assert steps.max() / steps.min() > 10  # spread over the range, not one value

    block = block.double()
    for p in block.parameters():  # away from the init: every weight matters
        p.data.add_(torch.randn_like(p), alpha=0.1)
    u = torch.randn(2, 13, d_model, dtype=torch.float64)  # 13: not a multiple of a chunk
    torch.testing.assert_close(block(u), mamba_reference(block, u), rtol=1e-12, atol=1e-12)


def test_mamba_block_is_mambapy_block():
    """Against mambapy's MambaBlock (mamba-ssm's architecture in PyTorch): a seed draws the same
    weights (the same parameters, created in the same order), checkpoints load both ways, and the
    same weights give the same outputs. mambapy computes A and D in float32 whatever the dtype,
    hence the tolerance."""
    mambapy = pytest.importorskip("mambapy.mamba")
    config = mambapy.MambaConfig(d_model=24, n_layers=1, d_state=16, expand_factor=2, d_conv=4,
                                 pscan=True)
    torch.manual_seed(3)
    theirs = mambapy.MambaBlock(config)
    torch.manual_seed(3)
    ours = mamba_blocks.MambaBlock(d_model=24, d_state=16, d_conv=4, expand=2)
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    for p in ours.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.1)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.double(), theirs.double()
    u = torch.randn(3, 21, 24, dtype=torch.float64)
    torch.testing.assert_close(ours(u), theirs(u), rtol=1e-6, atol=1e-8)


def test_mamba4rec_torch_backend_matches_the_reference_scan(make, monkeypatch):
    """The whole model (loss, every gradient, full-sort scores) on the PyTorch scan and on the
    step-by-step reference, same weights, float64."""
    from kernels.selective_scan_ref import selective_scan_ref

    model, train_data, test_data = make("Mamba4Rec")
    model = copy.deepcopy(model).double().eval()
    batch, eval_batch = next(iter(train_data)), next(iter(test_data))[0]

    def run():
        model.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        with torch.no_grad():
            scores = model.full_sort_predict(eval_batch)
        return loss.detach(), scores, [p.grad.clone() for p in model.parameters()]

    loss, scores, grads = run()
    monkeypatch.setattr(mamba_blocks, "_kernels",
                        lambda backend: (mamba_blocks._conv_silu_torch, selective_scan_ref))
    ref_loss, ref_scores, ref_grads = run()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs CUDA and Triton",
)


def on_backend(model, backend: str):
    """A copy of ``model`` on CUDA whose Mamba blocks run ``backend``, with the same weights."""
    module = load_baseline("Mamba4Rec")
    model = copy.deepcopy(model).cuda()
    for layer in model.mamba_layers:
        if backend == "cuda":  # mamba-ssm's own module, loaded from ours
            block = module.build_mamba_block("cuda", model.hidden_size, model.d_state,
                                             model.d_conv, model.expand).cuda()
            block.load_state_dict(layer.mamba.state_dict())
            layer.mamba = block
        else:
            layer.mamba.backend = backend
    return model


def loss_grads_scores(model, batch, eval_batch):
    model.eval()  # no dropout: every backend computes the same function
    model.zero_grad(set_to_none=True)
    loss = model.calculate_loss(batch)
    loss.backward()
    with torch.no_grad():
        scores = model.full_sort_predict(eval_batch)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, scores


@gpu
def test_mamba4rec_backends_agree_on_gpu(make, monkeypatch):
    """The whole model on each backend (float32, same weights) against the PyTorch scan in
    float64: loss, every gradient, full-sort scores; mamba-ssm's compiled Mamba too where it
    imports. (cuDNN's TF32 off: the PyTorch backend's convolution would round to it.)"""
    from tests.numerics import rel_err

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    model, train_data, test_data = make("Mamba4Rec")
    batch, eval_batch = next(iter(train_data)).to("cuda"), next(iter(test_data))[0].to("cuda")
    ref_loss, ref_grads, ref_scores = loss_grads_scores(on_backend(model, "torch").double(),
                                                        batch, eval_batch)
    backends = ["torch", "triton"]
    if load_baseline("Mamba4Rec").cuda_backend_problem("cuda") is None:
        backends.append("cuda")
    for backend in backends:
        loss, grads, scores = loss_grads_scores(on_backend(model, backend), batch, eval_batch)
        assert rel_err(loss.double(), ref_loss) < 1e-5, backend
        assert rel_err(scores.double(), ref_scores) < 1e-4, backend
        assert grads.keys() == ref_grads.keys(), backend
        for name, grad in grads.items():
            assert rel_err(grad.double(), ref_grads[name]) < 1e-4, (backend, name)


@gpu
def test_mamba4rec_triton_step_replays_as_eager(make):
    """The training step on the Triton backend is captured as a CUDA graph (pipeline/cuda_graph.py
    lists Mamba4Rec as checked), and its replays give the eager steps' losses and gradients
    (without dropout, whose draws are not what this checks)."""
    from pipeline.cuda_graph import WARMUP_STEPS, GraphedStep
    from tests.numerics import rel_err

    model, train_data, _ = make("Mamba4Rec")
    model = on_backend(model, "triton").train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batches = [b for b in train_data if len(b) == 32][:WARMUP_STEPS + 4]  # train_batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = GraphedStep(model.calculate_loss, optimizer, batch_size=32)
    for batch in batches[:WARMUP_STEPS + 1]:  # warm-up, then capture (and replay) on the last
        step(batch)
    assert step.graph is not None and not step.failed

    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=True)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    torch.cuda.manual_seed(123)
    losses = [step(batch).clone() for batch in batches[WARMUP_STEPS + 1:]]
    grads = [p.grad.clone() for p in model.parameters()]
    torch.cuda.manual_seed(123)
    for batch, loss in zip(batches[WARMUP_STEPS + 1:], losses):
        twin_optimizer.zero_grad(set_to_none=True)
        twin_loss = twin.calculate_loss(batch.to("cuda"))
        twin_loss.backward()
        twin_optimizer.step()
        assert abs(loss.item() - twin_loss.item()) <= 1e-5 * abs(twin_loss.item())
    for grad, p in zip(grads, twin.parameters(), strict=True):
        assert rel_err(grad, p.grad) < 1e-4


# ------------------------------------------------------------------------------------------------
# SSD4Rec
# ------------------------------------------------------------------------------------------------


def test_reverse_within_length_hand_worked():
    reverse = load_baseline("SSD4Rec").reverse_within_length
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 5, 1])
    expected = torch.tensor([[3, 2, 1, 0, 0], [8, 7, 6, 5, 4], [9, 0, 0, 0, 0]])
    torch.testing.assert_close(reverse(seq, lengths), expected)
    torch.testing.assert_close(reverse(expected, lengths), seq)
    features = torch.randn(3, 5, 4)
    torch.testing.assert_close(reverse(reverse(features, lengths), lengths), features)
    torch.testing.assert_close(reverse(features, lengths)[0, 0], features[0, 2])


def perturbed_at(x, position):
    y = x.clone()
    y[:, position] += torch.randn_like(y[:, position])
    return y


def changed(a, b):
    """Per position: does any channel differ? [B L D] -> [L] over the first row."""
    return ((a - b).abs() > 1e-9).any(-1)[0]


def test_ssd4rec_directions(make):
    model, _, _ = make("SSD4Rec")
    layer = copy.deepcopy(model.ssd_layers[0]).double().eval()
    torch.manual_seed(0)
    length, k = 9, 4
    x = torch.randn(1, length, model.hidden_size, dtype=torch.float64)
    y = perturbed_at(x, k)
    lengths = torch.tensor([7])  # slots 7, 8 are padding

    forward = changed(layer.forward_ssd(x), layer.forward_ssd(y))
    assert not forward[:k].any() and forward[k:].all()  # causal

    backward = changed(layer.backward_direction(x, lengths), layer.backward_direction(y, lengths))
    assert (
        backward[: k + 1].all() and not backward[k + 1 : 7].any()
    )  # anti-causal within the length

    both = changed(layer(x, lengths), layer(y, lengths))
    assert both[:7].all()  # every real position sees position k


def test_ssd4rec_one_direction_is_causal(make):
    model, _, _ = make("SSD4Rec", bidirectional=False)
    model.eval()
    item_seq = torch.tensor([[3, 5, 7, 2, 9, 4, 0, 0]])
    other = item_seq.clone()
    other[0, 3] = 11
    with torch.no_grad():
        diff = changed(
            model.encode(item_seq, torch.tensor([6])), model.encode(other, torch.tensor([6]))
        )
    assert not diff[:3].any() and diff[3:6].all()


def test_ssd4rec_bidirectional_padding_never_reaches_real_positions(make):
    model, _, _ = make("SSD4Rec")
    model.eval()
    item_seq = torch.tensor([[3, 5, 7, 2, 9, 4, 0, 0, 0, 0], [8, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([6, 2])
    junk = item_seq.clone()
    junk[0, 6:] = torch.tensor([12, 1, 30, 6])
    junk[1, 2:] = torch.arange(10, 18)
    with torch.no_grad():
        clean, noisy = model.encode(item_seq, lengths), model.encode(junk, lengths)
        # Control: the same change at real slots does reach the first position (bidirectional).
        assert changed(clean, model.encode(junk, torch.tensor([10, 10]))).any()
    real = torch.arange(10) < lengths.unsqueeze(1)
    torch.testing.assert_close(noisy[real], clean[real], rtol=0, atol=1e-6)
