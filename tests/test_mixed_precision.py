"""Mixed precision (``enable_amp``: bfloat16 autocast, pipeline/precision.py): TiM4Rec's bfloat16
step against its float32 step on the same weights and batch, what stays float32 inside it, the
kernels with bfloat16 activations, and the trainer's autocast.

bfloat16 keeps 8 significant bits: a rounding moves a value by at most 2^-9 of itself (rounding to
nearest, as PyTorch and a GPU do). The tolerances below are multiples of that, said where used.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ssd
from kernels.gated_norm_ref import gated_rmsnorm_ref
from pipeline import precision
from pipeline.errors import UserError
from ssd_ops.backend import triton_unavailable_reason
from ssd_ops.block_kernels import torch_block_kernels
from tests.numerics import rel_err
from tests.test_model import N_ITEMS, FakeDataset, make_batch, make_config, make_model
from tests.test_ssd import block_outputs_and_grads, random_inputs
from tim4rec import TiM4Rec

BF16 = torch.bfloat16
CHECKS = Path(__file__).with_name("kernel_checks.py")


def in_autocast(run, device="cpu"):
    """``run`` called under bfloat16 autocast on ``device`` (its backward, later, outside it)."""
    def ran(*args):
        with torch.autocast(device, dtype=BF16):
            return run(*args)
    return ran


def interaction_of(batch, seed=3):
    items, lengths, times = batch
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(1, N_ITEMS, (items.shape[0],), generator=g)
    return {"item_id_list": items, "item_length": lengths, "timestamp_list": times,
            "item_id": target}


def scores_loss_grads(model, interaction, amp: bool):
    """Full-sort scores and the loss (each under autocast with ``amp``), and every gradient of the
    loss (its backward outside autocast, as the trainer runs it)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16, enabled=amp):
        scores = model.full_sort_predict(interaction)
        loss = model.calculate_loss(interaction)
    loss.backward()
    return scores, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------ the model, CPU

@pytest.mark.parametrize("overrides", [dict(), dict(is_time=False),
                                       dict(num_layers=1, is_ffn=False)])
def test_bf16_model_is_close_to_the_float32_model(overrides):
    """The same float32 weights and batch, with and without autocast. The scores are a product
    in bfloat16 at the end of about ten roundings (two layers: in_proj, convolution, scan, norm,
    out_proj, FFN), so within 2e-2 of the float32 scores (in norm); the loss, a mean of
    log-softmaxes of them taken in float32, within 2e-3; the gradients, sums of such products,
    within 2e-2 as a whole. Every gradient is float32, and the same parameters have one."""
    model = make_model(dtype=torch.float32, **overrides)
    interaction = interaction_of(make_batch())
    scores, loss, grads = scores_loss_grads(model, interaction, amp=False)
    bf_scores, bf_loss, bf_grads = scores_loss_grads(model, interaction, amp=True)
    assert bf_scores.dtype == BF16 and bf_loss.dtype == torch.float32
    assert rel_err(bf_scores.float(), scores) < 2e-2
    assert abs(bf_loss.item() - loss.item()) < 2e-3 * abs(loss.item())
    assert bf_scores.float().ne(scores).any()  # bfloat16 did run
    assert bf_grads.keys() == grads.keys()
    assert all(g.dtype == torch.float32 for g in bf_grads.values())
    flat = [torch.cat([g.flatten() for g in gs.values()]) for gs in (bf_grads, grads)]
    assert rel_err(*flat) < 2e-2


@pytest.mark.parametrize("layers", [2, 1])
def test_what_stays_float32_under_autocast(monkeypatch, layers):
    """Inside the bfloat16 model (PyTorch path): every LayerNorm and the whole time branch take
    and give float32; out_proj and the FFN's products give bfloat16; the gated norm takes and
    gives bfloat16; the scan takes bfloat16 x, B, C and the step sizes times the time gate in
    float32, and gives bfloat16; the item scores are bfloat16 and the loss takes them in float32.
    (That the convolution, the scan and the norm compute in float32 inside: the next test.) One
    layer has no residual: its LayerNorm takes out_proj's output alone."""
    model = make_model(dtype=torch.float32, num_layers=layers)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = ({a.dtype for a in args if torch.is_tensor(a)}, out.dtype)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.Linear, nn.Conv1d, ssd.GatedRMSNorm,
                               nn.CrossEntropyLoss)):
            module.register_forward_hook(record(name))
    scan = ssd.chunk_scan_torch

    def recorded_scan(x, dt, A, B, C, *args, **kwargs):
        y = scan(x, dt, A, B, C, *args, **kwargs)
        seen.setdefault("scan", []).append((x.dtype, dt.dtype, A.dtype, B.dtype, C.dtype, y.dtype))
        return y

    def recorded_scores(*args):
        scores = item_scores(*args)
        seen.setdefault("scores", []).append(scores.dtype)
        return scores

    item_scores = model.item_scores
    monkeypatch.setattr(model, "item_scores", recorded_scores)
    monkeypatch.setattr(ssd, "chunk_scan_torch", recorded_scan)
    with torch.autocast("cpu", dtype=BF16):
        loss = model.calculate_loss(interaction_of(make_batch()))
    loss.backward()

    f32 = torch.float32
    float32_parts = ["in_layer_norm", "layer_norm_time"] + [
        f"ssd_layers.{i}.{part}" for i in range(layers) for part in (
            "layer_norm", "ffn.layer_norm", "ssd.time_layer_norm", "ssd.conv1d4time_1",
            "ssd.conv1d4time_2", "ssd.mlp4time_scale.1", "ssd.mlp4time_scale.3",
            "ssd.time_gate_residual.1")]
    for name in float32_parts:
        assert seen[name] == ({f32}, f32), name
    for i in range(layers):
        for part in ("ssd.out_proj", "ffn.fc1", "ffn.fc2"):
            assert seen[f"ssd_layers.{i}.{part}"][1] == BF16, (i, part)
        assert seen[f"ssd_layers.{i}.ssd.norm"] == ({BF16}, BF16)
    assert seen["loss_fct"][0] == {f32, torch.int64}
    assert seen["scores"] == [BF16]
    assert seen["scan"] == [(BF16, f32, f32, BF16, BF16, BF16)] * layers


def test_float32_parts_round_only_their_result():
    """The scan (states and step sizes), the gated norm (its statistics) and the convolution
    compute in float32 from bfloat16 inputs under autocast: their bfloat16 result is the float64
    result of the same inputs rounded once (5e-4 in norm allows a rare tie broken otherwise;
    computing in bfloat16 inside misses by several times that: a rounding moves an element by up
    to 2^-9). The time branch gives under autocast what it gives without."""
    g = torch.Generator().manual_seed(0)
    inputs = {k: v if v is None else v.detach()
              for k, v in random_inputs(2, 50, 4, 8, 1, 16, dtype=torch.float32, seed=2).items()}
    inputs.update(z=None, **{k: inputs[k].to(BF16) for k in ("x", "B", "C")})
    with torch.autocast("cpu", dtype=BF16):
        y = ssd.chunk_scan_torch(**inputs, chunk_size=16, dt_softplus=True)  # 4 chunks
    exact = ssd.chunk_scan_torch(**{k: v if v is None else v.double() for k, v in inputs.items()},
                                 chunk_size=16, dt_softplus=True)
    assert y.dtype == BF16 and rel_err(y.double(), exact.to(BF16).double()) < 5e-4

    y, z = (torch.randn(37, 128, generator=g).to(BF16) for _ in range(2))
    weight = torch.randn(128, generator=g)
    with torch.autocast("cpu", dtype=BF16):
        out = gated_rmsnorm_ref(y, z, weight, 1e-5)
    exact = gated_rmsnorm_ref(y.double(), z.double(), weight.double(), 1e-5)
    assert out.dtype == BF16 and rel_err(out.double(), exact.to(BF16).double()) < 5e-4

    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, backend="torch")
    xBC = torch.randn(3, 12, 32 + 16, generator=g).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        out = block.convolve(xBC)
    exact = block.double().convolve(xBC.double())
    assert out.dtype == BF16 and rel_err(out.double(), exact.to(BF16).double()) < 5e-4

    block.float()
    tau = torch.randn(3, block.nheads, 12, generator=g)
    gate = block.time_step_gate(tau)
    signal = block.next_time_signal(tau, gate)
    model = make_model(dtype=torch.float32)
    _, lengths, times = make_batch()
    tau0 = model.time_signal(times, lengths)
    with torch.autocast("cpu", dtype=BF16):
        assert torch.equal(block.time_step_gate(tau), gate)
        assert torch.equal(block.next_time_signal(tau, gate), signal)
        assert torch.equal(model.time_signal(times, lengths), tau0)


@pytest.mark.parametrize("is_time,with_at", [(True, False), (False, True)])
def test_fused_node_under_autocast_equals_the_module_path(is_time, with_at):
    """FusedSSDBlock (PyTorch kernels) under autocast casts as autocast casts the module path: the
    same bfloat16 output (2^-8: at most a rounding apart), and the gradients within 1e-2 (its
    backward rounds the same bfloat16 intermediates, some in another order); those of u, tau and
    every weight in float32."""
    torch.manual_seed(0)
    block = ssd.TimeAwareSSD(16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=4,
                             is_time=is_time, backend="torch").eval()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.1)
    u = torch.randn(3, 12, 16, requires_grad=True)
    tau = torch.randn(3, block.nheads, 12, requires_grad=True) if is_time else None
    at = torch.tensor([11, 0, 5]) if with_at else None
    plain_out, plain = block_outputs_and_grads(
        block, u, tau, in_autocast(lambda u, tau: block(u, tau, at)))
    fused_out, fused = block_outputs_and_grads(block, u, tau, in_autocast(
        lambda u, tau: block.forward_fused(u, tau, torch_block_kernels(), at)))
    assert plain_out.dtype == fused_out.dtype == BF16
    assert rel_err(fused_out.double(), plain_out.double()) < 2**-8
    assert fused.keys() == plain.keys()
    for name in plain:
        assert fused[name].dtype == torch.float32, name
        assert rel_err(fused[name], plain[name]) < 1e-2, name


def test_inner_ffn_under_autocast_equals_the_plain_modules():
    """The FFN's inner node (PyTorch kernels; fc1's output kept, or computed again) under
    autocast: the plain modules' bfloat16 output (2^-8) and gradients (1e-2, as above) with the
    same mask; float32 gradients."""
    from tim4rec import FeedForward, _InnerFFN, torch_ffn_kernels

    torch.manual_seed(0)
    ffn = FeedForward(8, 0.3).train()
    h = torch.randn(3, 5, 8, requires_grad=True)
    leaves = [h, ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight, ffn.fc2.bias]
    runs = [ffn.inner, lambda h: ffn.inner(h, recompute=True), lambda h: _InnerFFN.apply(
        h, *leaves[1:], ffn.dropout.p, False, torch_ffn_kernels())]
    results = []
    for run in runs:
        torch.manual_seed(1)
        out = in_autocast(run)(h)
        results.append((out, torch.autograd.grad(out.float().square().sum(), leaves)))
    (plain_out, plain), *nodes = results
    assert plain_out.dtype == BF16
    for out, grads in nodes:
        assert out.dtype == BF16 and rel_err(out.double(), plain_out.double()) < 2**-8
        for grad, ref in zip(grads, plain, strict=True):
            assert grad.dtype == torch.float32 and rel_err(grad, ref) < 1e-2


# --------------------------------------------------------------------------- the Triton kernels

def _within(errors: dict) -> list:
    return [(name, err, tol) for name, (err, tol) in errors.items() if not err <= tol]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_kernels_with_bf16_activations_on_the_cpu():
    """Each kernel with bfloat16 activations and float32 weights through Triton's interpreter (a
    process of its own): outputs in their documented dtypes, within the tolerances that
    tests/kernel_checks.py states beside each; the fused SSD block and FFN under autocast against
    the module path."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(CHECKS), "bf16"], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) > 80
    assert not _within(errors)


# ------------------------------------------------------------------------------------ baselines

@pytest.mark.parametrize("name", ["SASRec", "BERT4Rec", "GRU4Rec", "Caser", "TiSASRec", "LRURec",
                                  "Mamba4Rec", "SSD4Rec"])
def test_every_baseline_trains_a_step_in_bf16_autocast(tiny_data_path, tmp_path, name):
    """RecBole's own AMP, bfloat16 here: each baseline's training loss under autocast is float32
    and within 2e-3 of its float32 loss (same weights, batch and dropout: the bound of the TiM4Rec
    test above), and its gradients are finite and float32."""
    from tests.test_baselines import build, requires

    requires(name)
    model, train_data, _ = build(name, tiny_data_path, tmp_path)
    model.train()
    batch = next(iter(train_data))
    losses = []
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=BF16, enabled=amp):
            loss = model.calculate_loss(batch)
        loss.backward()
        losses.append(loss)
    assert losses[1].dtype == torch.float32
    assert abs(losses[1].item() - losses[0].item()) < 2e-3 * abs(losses[0].item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------- the trainer

@pytest.fixture()
def tiny_run(tiny_data_path, tmp_path):
    return {"dataset": "tiny", "data_path": str(tiny_data_path), "epochs": 1,
            "MAX_ITEM_LIST_LENGTH": 10, "train_batch_size": 64, "eval_batch_size": 128,
            "show_progress": False, "use_gpu": False, "topk": [5, 10], "hidden_size": 16,
            "checkpoint_dir": str(tmp_path / "saved"), "log_dir": str(tmp_path / "log"),
            "tensorboard_dir": str(tmp_path / "tb"), "enable_amp": True}


@pytest.mark.parametrize("model,settings", [
    ("TiM4Rec", {"d_state": 8, "head_dim": 8, "chunk_size": 4}),
    ("SASRec", {"n_heads": 2, "inner_size": 32, "n_layers": 1}),
])
def test_enable_amp_trains_in_bf16_autocast_and_evaluates_in_float32(tiny_run, model, settings,
                                                                     monkeypatch):
    """With ``enable_amp``, every training forward runs in bfloat16 autocast (set by the trainer,
    not autocast's default, here made float16), and every evaluation without autocast; the run
    trains to a finite loss."""
    from pipeline.registry import find_model
    from pipeline.workflow import train

    model_class = find_model(model).model_class
    states = {"train": [], "eval": []}

    def recording(method, kind):
        def run(self, interaction):
            enabled = torch.is_autocast_enabled("cpu")
            states[kind].append((enabled, torch.get_autocast_dtype("cpu") if enabled else None))
            return method(self, interaction)
        return run

    monkeypatch.setattr(model_class, "calculate_loss",
                        recording(model_class.calculate_loss, "train"))
    monkeypatch.setattr(model_class, "full_sort_predict",
                        recording(model_class.full_sort_predict, "eval"))
    default = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    try:
        result = train(overrides={**tiny_run, **settings}, model=model, quiet=True)
    finally:
        torch.set_autocast_dtype("cpu", default)
    assert states["train"] and set(states["train"]) == {(True, BF16)}
    assert states["eval"] and set(states["eval"]) == {(False, None)}
    assert all(math.isfinite(epoch["train_loss"]) for epoch in result["epochs"])


def test_enable_scaler_is_refused(tiny_run):
    """float16's loss scaling has no place in bfloat16 training: a clear error, not ignored."""
    from pipeline.settings import build_config

    with pytest.raises(UserError, match="enable_scaler"):
        build_config(None, [], {**tiny_run, "enable_scaler": True})
    build_config(None, [], tiny_run)  # enable_amp alone is fine


def test_autocast_of_the_trainer_is_bfloat16():
    with precision.autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
    with precision.autocast("cpu", enabled=False):
        assert not torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------------------------- the GPU

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or triton_unavailable_reason() is not None,
    reason="needs CUDA and mamba-ssm's Triton kernels")


@cuda
def test_kernels_with_bf16_activations_on_gpu():
    from tests.kernel_checks import all_bf16_errors

    errors = all_bf16_errors("cuda")
    print(errors)
    assert not _within(errors)


@cuda
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("is_time", [True, False])
def test_bf16_triton_model_is_close_to_float32_on_gpu(is_time, packed):
    """The fused Triton path (mamba-ssm's scan, this project's kernels, the FFN recomputed, the
    last layer at the scored position) under CUDA autocast, against the same model in float32
    and against the PyTorch path under autocast, same weights and batch (no dropout): scores
    within 2e-2 and gradients within 3e-2 as a whole (the float32 Triton path is itself 1e-2 from
    the PyTorch path's gradients, TF32 inside its kernels: tests/test_model.py); every gradient
    float32. ``packed``: the real positions only, in a fixed number of slots (the captured
    step's layout)."""
    from tests.test_cuda_graph import batch_of

    overrides = dict(device=torch.device("cuda"), MAX_ITEM_LIST_LENGTH=50, hidden_size=64,
                     d_state=32, head_dim=32, chunk_size=32, is_time=is_time, recompute=True)
    models = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        models[backend] = TiM4Rec(make_config(ssd_backend=backend, **overrides),
                                  FakeDataset()).cuda().eval()
    models["torch"].load_state_dict(models["triton"].state_dict())
    batch = batch_of(64, seed=2)
    size = int(batch["item_length"].sum()) + 100 if packed else None
    results = {}
    for name, model, amp in (("triton", models["triton"], False), ("triton amp", models["triton"],
                                                                    True),
                             ("torch amp", models["torch"], True)):
        model.zero_grad(set_to_none=True)
        with model.fixed_pack_size(size if name != "torch amp" else None):
            with torch.autocast("cuda", dtype=BF16, enabled=amp):
                scores = model.full_sort_predict(batch)
                loss = model.calculate_loss(batch)
            loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(g.dtype == torch.float32 for g in grads), name
        results[name] = scores.float(), torch.cat([g.flatten() for g in grads])
    for name in ("triton amp", "torch amp"):
        assert rel_err(results[name][0], results["triton"][0]) < 2e-2, name
        assert rel_err(results[name][1], results["triton"][1]) < 3e-2, name
    assert rel_err(results["triton amp"][0], results["torch amp"][0]) < 2e-2
