"""pipeline/precompile.py: kernels compiled ahead by a dry pass, and nothing else changed."""

import copy

import pytest
import torch

from pipeline import autotune, precompile
from ssd_ops.backend import triton_unavailable_reason
from tests.numerics import rel_err
from tests.test_cuda_graph import batch_of
from tests.test_model import FakeDataset, make_config
from tim4rec import TiM4Rec

cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton_unavailable_reason() is not None,
                          reason="needs CUDA and mamba-ssm's Triton kernels")


class Tuner:
    """Stands in for triton's Autotuner: a cache of choices, a benchmark, a disk-cache flag."""

    def __init__(self):
        self.cache = {("known",): "chosen"}
        self.cache_results = True
        self.benchmarked = []

    def do_bench(self, kernel_call, quantiles=None):
        raise AssertionError("the real benchmark ran during the dry pass")

    def run(self, key):
        if key not in self.cache:
            self.benchmarked.append(key)
            self.do_bench(lambda: None)
            self.cache[key] = "picked"
        return self.cache[key]


def test_the_dry_pass_leaves_autotuners_undecided(monkeypatch):
    tuner = Tuner()
    monkeypatch.setattr(autotune, "_autotuners", lambda: {"ssd_bmm._bmm_chunk_fwd_kernel": tuner})
    calls = []
    with precompile._undecided_autotuners():
        assert tuner.do_bench(lambda: calls.append(1)) == [0.0, 0.0, 0.0]  # one call, no timing
        assert not tuner.cache_results
        assert tuner.run(("new",)) == "picked"
        assert tuner.run(("new",)) == "picked"  # benchmarked again: every call site's kernels
        assert tuner.run(("known",)) == "chosen"
        assert tuner.cache == {("known",): "chosen"}
    assert calls == [1]
    assert tuner.benchmarked == [("new",), ("new",)]
    assert tuner.cache_results
    with pytest.raises(AssertionError, match="real benchmark"):  # the class's own methods again
        tuner.run(("new",))


@cuda
@pytest.mark.parametrize("amp", [False, True])
def test_compiled_ahead_the_step_compiles_nothing_and_computes_the_same(amp):
    """Shapes no other test uses, and no autotune choices known: the dry pass records every
    candidate's compilation and chooses nothing; the real step then compiles nothing (a candidate
    that cannot compile is tried again, and fails again), autotunes, and gives the loss and
    gradients of a twin model that did not compile ahead (same dropout). ``amp``: the forward in
    bfloat16 autocast (its kernels are compiled for bfloat16), as the trainer runs it."""
    from pipeline import precision
    from triton import knobs

    config = make_config(device=torch.device("cuda"), ssd_backend="triton", MAX_ITEM_LIST_LENGTH=37,
                         hidden_size=48, d_state=16, head_dim=16, chunk_size=16, fused=True)
    torch.manual_seed(0)
    model = TiM4Rec(config, FakeDataset()).cuda().train()
    twin = copy.deepcopy(model)
    batch = batch_of(40, seed=3, length=37)
    tuners = autotune._autotuners()
    saved = {name: dict(t.cache) for name, t in tuners.items()}
    compilations = []
    try:
        for t in tuners.values():
            t.cache.clear()
        torch.cuda.manual_seed(7)
        done = precompile.compile_step(model, batch, amp=amp, workers=4)
        assert done["kernels"] > done["failed"]
        assert all(not t.cache for t in tuners.values())  # the dry pass chose nothing
        assert model.training and all(p.grad is None for p in model.parameters())

        knobs.runtime.jit_post_compile_hook = lambda **kw: compilations.append(kw["repr"])
        with precision.autocast("cuda", amp):
            loss = model.calculate_loss(batch)
        loss.backward()
        knobs.runtime.jit_post_compile_hook = None
        assert compilations == [], (done, compilations)
        assert any(t.cache for t in tuners.values())  # the real step chose

        torch.cuda.manual_seed(7)
        with precision.autocast("cuda", amp):
            twin_loss = twin.calculate_loss(batch)
        twin_loss.backward()
    finally:
        knobs.runtime.jit_post_compile_hook = None
        for name, t in tuners.items():
            t.cache.clear()
            t.cache.update(saved[name])
    assert abs(loss.item() - twin_loss.item()) <= 1e-6 * abs(twin_loss.item())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None and q.grad.norm() > 0:
            # atomics: the order of sums only (which may move a bfloat16 rounding by a unit)
            assert rel_err(p.grad, q.grad) < (1e-2 if amp else 1e-4), name
