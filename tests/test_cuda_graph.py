"""The CUDA-graph training step (pipeline/cuda_graph.py) against the eager step, on a GPU."""

import copy

import pytest
import torch

from pipeline.cuda_graph import (
    WARMUP_STEPS,
    GraphedStep,
    PackedSize,
    make_capturable,
    reason_not_captured,
    reset_capturable,
    unsupported_reason,
)
from ssd_ops.backend import triton_unavailable_reason
from tests.numerics import rel_err
from tests.test_model import N_ITEMS, FakeDataset, make_config
from tim4rec import TiM4Rec

cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton_unavailable_reason() is not None,
                          reason="needs CUDA and mamba-ssm's Triton kernels")


def batch_of(rows, seed, length=50, device="cuda", shortest=1):
    from recbole.data.interaction import Interaction

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, length + 1, (rows,), generator=g)
    pad = torch.arange(length) >= lengths[:, None]
    items = torch.randint(1, N_ITEMS, (rows, length), generator=g).masked_fill(pad, 0)
    gaps = torch.randint(60, 10**6, (rows, length), generator=g)
    times = (1e9 + gaps.cumsum(1)).float().masked_fill(pad, 0)
    return Interaction({"item_id_list": items, "item_length": lengths, "timestamp_list": times,
                        "item_id": torch.randint(1, N_ITEMS, (rows,), generator=g)}).to(device)


def test_unsupported_reasons():
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert unsupported_reason(adam, clip_grad_norm=None) is None  # bf16 too: captured in autocast
    assert "clip" in unsupported_reason(adam, clip_grad_norm={"max_norm": 1})
    assert "SGD" in unsupported_reason(sgd, clip_grad_norm=None)


def test_which_runs_capture_their_step():
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])

    def reason(setting, model, distributed, clip=None):
        return reason_not_captured(setting, model, distributed, adam, clip_grad_norm=clip)

    assert reason("auto", "TiM4Rec", False) is None
    assert reason("auto", "TiM4Rec", True) is None
    assert reason("auto", "SASRec", False) is None
    assert "several GPUs" in reason("auto", "SASRec", True)
    assert "one GPU" in reason("auto", "BERT4Rec", False)
    assert reason(True, "BERT4Rec", True) is None
    assert "False" in reason(False, "TiM4Rec", False)
    assert "clip" in reason(True, "TiM4Rec", False, clip={"max_norm": 1})


def test_a_capturable_state_resumes_on_the_cpu():
    """A checkpoint of a CUDA-graph run holds a capturable Adam state, which PyTorch refuses to
    step on the CPU; once reset, it steps as the plain state would."""
    params = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(2)]
    saved = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    saved.step()
    make_capturable(saved)
    state = saved.state_dict()
    assert state["param_groups"][0]["capturable"]

    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = torch.optim.Adam(plain_params, lr=0.1)
    resumed.load_state_dict(copy.deepcopy(state))  # (loading may share the moment tensors)
    for p in plain_params:
        p.grad = torch.ones_like(p)
    with pytest.raises((AssertionError, RuntimeError), match="capturable"):
        resumed.step()
    reset_capturable(resumed)
    resumed.step()
    reference = torch.optim.Adam(params, lr=0.1)  # the same state, never capturable
    reference.load_state_dict({**copy.deepcopy(state), "param_groups": [
        {**g, "capturable": False} for g in state["param_groups"]]})
    reference.step()
    for p, q in zip(plain_params, params):
        assert torch.equal(p, q)


@cuda
@pytest.mark.parametrize("source,packed,amp", [("cuda", False, False), ("cpu", False, False),
                                               ("cpu", True, False), ("cuda", False, True),
                                               ("cpu", True, True)])
@pytest.mark.parametrize("is_time", [True, False])
def test_replayed_steps_equal_eager_steps(is_time, source, packed, amp):
    """From the same weights, optimizer state and random seed, replays of the captured step give
    the eager steps' losses, gradients and Adam moments (float32 tolerance), for new batches copied
    into the graph (from the CPU: queued without waiting, one behind the other); a partial batch in
    between runs eagerly and leaves the graph usable. ``packed``: the step packs the batches' real
    positions into 2048 slots (the eager steps too); a batch over that runs eagerly, padded.

    ``amp``: every step is called under bfloat16 autocast (as the trainer calls it with
    enable_amp), the eager twin's forward too, its backward outside. The same kernels on the same
    values, but an element that the order of atomic additions moves across a bfloat16 rounding
    boundary moves by 2^-8: the loss within 1e-4, gradients and moments within 1e-2 (1e-3
    without amp) of their norm, or of 1e-6 of the whole gradient's where that is larger. The
    scores of every step, the captured one too, are bfloat16 (float32 without amp)."""
    config = make_config(device=torch.device("cuda"), ssd_backend="triton", MAX_ITEM_LIST_LENGTH=50,
                         hidden_size=64, d_state=32, head_dim=32, chunk_size=32, is_time=is_time,
                         recompute=True)  # the capture holds the recomputation in backward too
    torch.manual_seed(0)
    model = TiM4Rec(config, FakeDataset()).cuda().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    size = PackedSize(model, 2048) if packed else None  # 64 x 50 positions, 1632 real on average
    step = GraphedStep(model.calculate_loss, optimizer, batch_size=64, packed=size)

    def in_amp():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)

    score_dtypes, item_scores = [], model.item_scores

    def recorded_scores(*args):
        scores = item_scores(*args)
        score_dtypes.append(scores.dtype)
        return scores

    model.item_scores = recorded_scores
    for i in range(WARMUP_STEPS + 1):  # warm-up, then capture (and replay) on the last
        with in_amp():
            step(batch_of(64, seed=i))
    assert step.graph is not None and not step.failed
    with in_amp():
        assert torch.isfinite(step(batch_of(17, seed=10, device=source)))  # partial batch: eager
    if packed:  # 2240 real positions or more: eager, padded
        over = batch_of(64, seed=11, device=source, shortest=35)
        with in_amp():
            assert not size.fits(over) and torch.isfinite(step(over))
    del model.item_scores  # (before the copy below)
    assert set(score_dtypes) == {torch.bfloat16 if amp else torch.float32}

    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=True)
    # A copy: loading keeps tensors that already sit on the right device, so the two optimizers
    # would otherwise share (and both update) the same moment tensors.
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    batches = [batch_of(64, seed=20 + i, device=source) for i in range(3)]

    torch.cuda.manual_seed(123)
    with in_amp():
        losses = [step(batch).clone() for batch in batches]  # no synchronisation in between
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    torch.cuda.manual_seed(123)
    twin_losses = []
    for batch in batches:
        assert not packed or size.fits(batch)
        twin_optimizer.zero_grad(set_to_none=True)
        with twin.fixed_pack_size(size.size if packed else None), in_amp():
            twin_loss = twin.calculate_loss(batch.to("cuda"))
        twin_loss.backward()
        twin_optimizer.step()
        twin_losses.append(twin_loss.detach())

    loss_tolerance, tolerance = (1e-4, 1e-2) if amp else (1e-5, 1e-3)
    for loss, twin_loss in zip(losses, twin_losses):
        assert abs(loss.item() - twin_loss.item()) <= loss_tolerance * abs(twin_loss.item())
    # A gradient that cancels to a sliver of the whole (dt_bias: 1e-7 or less where the whole is
    # near 1) keeps the rounding of the terms it sums, not of its own size: each gradient and moment
    # is held relative to its own norm, or to 1e-6 of the whole gradient's where that is larger.
    whole = torch.cat([q.grad.flatten() for q in twin.parameters() if q.grad is not None]).norm()

    def close(a, b) -> bool:  # atomics in the backward: the order of sums only
        return (a - b).norm() <= tolerance * torch.maximum(b.norm(), 1e-6 * whole)

    for (name, p), g, q in zip(model.named_parameters(), grads, twin.parameters()):
        assert (g is None) == (q.grad is None), name
        if q.grad is None or q.grad.norm() == 0:
            continue
        assert g.dtype == torch.float32, name
        assert close(g, q.grad), (name, rel_err(g, q.grad))
        m, twin_m = optimizer.state[p]["exp_avg"], twin_optimizer.state[q]["exp_avg"]
        assert close(m, twin_m), (name, rel_err(m, twin_m))
