"""TiM4Rec itself: shapes, causality, upstream checkpoint keys,
and parity with the authors' model."""

import pytest
import torch
import yaml

from pipeline import ROOT
from ssd_ops.backend import triton_unavailable_reason as ssd_triton_reason
from ssd_ops.packing import Packing
from tests.numerics import rel_err
from tests.upstream_reference import upstream_keys, upstream_scores
from tim4rec import TiM4Rec

N_ITEMS = 23


class FakeDataset:
    """What SequentialRecommender reads from a RecBole dataset."""

    def __init__(self, with_time=True):
        self.field2type = {"item_id_list": None, **({"timestamp_list": None} if with_time else {})}

    def num(self, field):
        return N_ITEMS


def make_config(**overrides):
    config = yaml.safe_load((ROOT / "config" / "model" / "TiM4Rec.yaml").read_text())
    config["norm_eps"] = float(config["norm_eps"])
    config.update(
        USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", TIME_FIELD="timestamp",
        LIST_SUFFIX="_list", ITEM_LIST_LENGTH_FIELD="item_length", NEG_PREFIX="neg_",
        MAX_ITEM_LIST_LENGTH=12, device=torch.device("cpu"), loss_type="CE", hidden_size=16,
        d_state=8, head_dim=8, chunk_size=4, ssd_backend="torch")
    config.update(overrides)
    return config


def make_model(seed=0, dtype=torch.float64, with_time=True, **overrides):
    torch.manual_seed(seed)
    model = TiM4Rec(make_config(**overrides), FakeDataset(with_time)).to(dtype).eval()
    for p in model.parameters():  # move away from the symmetric init so every weight matters
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def make_batch(batch=5, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, 1, 3, length - 1, 7][:batch])
    items = torch.randint(1, N_ITEMS, (batch, length), generator=g)
    gaps = torch.randint(60, 90 * 86400, (batch, length), generator=g)
    times = (1_000_000_000 + gaps.cumsum(1)).float()
    pad = torch.arange(length) >= lengths[:, None]
    return items.masked_fill(pad, 0), lengths, times.masked_fill(pad, 0.0)


PARITY_CASES = {
    "movie_64d": dict(),
    "without_time": dict(is_time=False),
    "p2p_one_layer": dict(p2p_residual=True, num_layers=1),
    "no_ffn_kaiming_off": dict(is_ffn=False, is_kai_ming_init=False, time_drop_out=0.0),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_full_sort_scores_equal_the_authors_model(case):
    model = make_model(**PARITY_CASES[case])
    items, lengths, times = make_batch()
    interaction = {"item_id_list": items, "item_length": lengths, "timestamp_list": times}
    ours = model.full_sort_predict(interaction)
    theirs = upstream_scores(model.state_dict(), make_config(**PARITY_CASES[case]), items, lengths,
                             times)
    assert ours.shape == (5, N_ITEMS)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-8), (ours - theirs).abs().max()


@pytest.mark.parametrize("is_time,num_layers,is_ffn", [(True, 2, True), (False, 3, True),
                                                        (True, 1, False)])
def test_state_dict_keys_are_the_authors(is_time, num_layers, is_ffn):
    model = make_model(is_time=is_time, num_layers=num_layers, is_ffn=is_ffn)
    assert set(model.state_dict()) == upstream_keys(num_layers, is_time, is_ffn)
    conv = model.state_dict()["ssd_layers.0.ssd.conv1d.weight"]
    assert conv.shape == (2 * 16 + 2 * 8, 1, 4)  # PyTorch Conv1d layout [channels, 1, K]


def test_loads_an_upstream_state_dict_unchanged():
    source = make_model(seed=3)
    upstream_state = {k: v.clone() for k, v in source.state_dict().items()}
    target = make_model(seed=4)
    target.load_state_dict(upstream_state)
    items, lengths, times = make_batch()
    assert torch.equal(target(items, lengths, times), source(items, lengths, times))


def test_without_time_skips_time_weights_of_an_upstream_checkpoint():
    with_time = make_model(seed=3, is_time=True).state_dict()
    model = make_model(seed=4, is_time=False)
    model.load_state_dict(with_time)  # time-branch tensors are unused without time
    assert torch.equal(model.item_embedding.weight, with_time["item_embedding.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        make_model(is_time=True).load_state_dict(model.state_dict())


@pytest.mark.parametrize("dropout", [0.0, 0.3, 1.0])
def test_recomputed_ffn_equals_the_plain_modules(dropout):
    """The FFN that recomputes its hidden layer in backward gives the plain modules' output and
    gradients (float64), with the same dropout mask from the same random state."""
    from tim4rec import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(6, dropout).to(torch.float64).train()
    for p in ffn.parameters():
        p.data.normal_()
    h = torch.randn(3, 5, 6, dtype=torch.float64)
    results = []
    for recompute in (False, True):
        torch.manual_seed(1)
        x = h.clone().requires_grad_()
        out = ffn.inner(x, recompute)
        (out * torch.arange(6.0, dtype=torch.float64)).sum().backward()
        grads = [p.grad for p in ffn.parameters() if p.grad is not None]
        results.append([out.detach(), x.grad, *grads])
        ffn.zero_grad(set_to_none=True)
    plain, recomputed = results
    assert len(plain) == len(recomputed) == 6
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    if dropout:  # the mask was in use: not the output without dropout
        assert not torch.allclose(plain[0], ffn.eval().inner(h))


@pytest.mark.parametrize("recompute", [False, True])
def test_inner_ffn_gradients_by_finite_differences(recompute):
    from tim4rec import _InnerFFN, torch_ffn_kernels

    torch.manual_seed(0)
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in [(2, 3, 4), (8, 4), (8,), (4, 8), (4,)]]
    assert torch.autograd.gradcheck(
        lambda *t: _InnerFFN.apply(*t, 0.0, recompute, torch_ffn_kernels()), inputs)


def test_shapes_and_loss():
    model = make_model(dtype=torch.float32).train()
    items, lengths, times = make_batch()
    target = torch.randint(1, N_ITEMS, (5,))
    interaction = {"item_id_list": items, "item_length": lengths, "timestamp_list": times,
                   "item_id": target}
    assert model.encode(items, lengths, times).shape == (5, 12, 16)
    assert model(items, lengths, times).shape == (5, 16)
    assert model.predict(interaction).shape == (5,)
    loss = model.calculate_loss(interaction)
    loss.backward()
    assert torch.isfinite(loss)
    # The last layer's next time signal feeds nothing (as upstream):
    # only its weights get no gradient.
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == {f"ssd_layers.1.ssd.{m}.{w}"
                       for m in ("time_gate_residual.1", "time_layer_norm")
                       for w in ("weight", "bias")}


@pytest.mark.parametrize("overrides", [dict(), dict(is_time=False),
                                       dict(num_layers=1, is_ffn=False)])
def test_last_position_only_gives_the_scores_and_gradients_of_every_position(overrides):
    """``last_position_only`` (the default): the last layer computes what follows its scan at the
    scored position only. The scores and loss gradients of computing every position, float64."""
    items, lengths, times = make_batch()
    interaction = {"item_id_list": items, "item_length": lengths, "timestamp_list": times,
                   "item_id": torch.randint(1, N_ITEMS, (5,))}
    scores, grads = {}, {}
    for only in (False, True):
        model = make_model(last_position_only=only, **overrides)
        scores[only] = model.full_sort_predict(interaction)
        model.calculate_loss(interaction).backward()
        grads[only] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(scores[True], scores[False], rtol=1e-12, atol=1e-13)
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("overrides", [dict(), dict(is_time=False),
                                       dict(num_layers=1, is_ffn=False),
                                       dict(last_position_only=False)])
def test_skip_padding_gives_the_scores_and_gradients_of_the_padded_batch(overrides, monkeypatch):
    """``skip_padding`` (the default): the layers compute at the batch's real positions only,
    laid end to end (on the CPU, exactly as many slots; in a fixed number of slots, with filler
    after them, as a captured GPU step does), here in rows of 12 nominal slots. The scores and
    loss gradients of the padded batch, float64."""
    monkeypatch.setattr(Packing, "ROW_SEQUENCES", 1)
    monkeypatch.setattr(TiM4Rec, "CPU_PACK_BELOW", 1.0)  # pack this batch, whatever its share
    items, lengths, times = make_batch()
    interaction = {"item_id_list": items, "item_length": lengths, "timestamp_list": times,
                   "item_id": torch.randint(1, N_ITEMS, (5,))}
    results = {}
    for run in ("padded", "packed", "fixed size"):
        model = make_model(skip_padding=run != "padded", **overrides)
        assert (model.packing(lengths, 12) is None) == (run == "padded")
        with model.fixed_pack_size(48 if run == "fixed size" else None):  # 35 real positions
            scores = model.full_sort_predict(interaction)
            model.calculate_loss(interaction).backward()
        results[run] = scores, {n: p.grad for n, p in model.named_parameters()
                                if p.grad is not None}
    scores, grads = results.pop("padded")
    for run, (run_scores, run_grads) in results.items():
        assert torch.allclose(run_scores, scores, rtol=1e-12, atol=1e-13), run
        assert run_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(run_grads[name], grad, rtol=1e-10, atol=1e-13), (run, name)


def test_pack_size_covers_batches_of_the_training_lengths():
    model = make_model()
    lengths = torch.randint(1, 13, (5000,), generator=torch.Generator().manual_seed(0))
    size = model.pack_size_for(lengths, 100)
    sums = torch.stack([lengths[torch.randperm(5000)[:100]].sum() for _ in range(300)])
    assert size % 256 == 0 and sums.max() <= size <= 100 * 12
    assert size < sums.float().mean() + 5 * lengths.double().std() * 10 + 256  # not far over
    assert model.pack_size_for(torch.full((50,), 12), 100) == 1200  # never over B x L
    assert make_model(skip_padding=False).pack_size_for(lengths, 100) is None
    batch = {"item_length": torch.tensor([12, 1, 3])}
    assert model.fits_pack_size(batch, 16) and not model.fits_pack_size(batch, 15)
    # on the CPU, a batch mostly of real positions stays padded, unless a size is fixed
    mostly_real = torch.tensor([12, 12, 9])  # 33 of 36
    assert model.packing(mostly_real, 12) is None
    assert model.packing(torch.tensor([2, 5, 1]), 12) is not None
    with model.fixed_pack_size(48):
        assert model.packing(mostly_real, 12) is not None


def test_causal_without_time():
    model = make_model(is_time=False)
    items, lengths, _ = make_batch()
    changed = items.clone()
    changed[:, 6:] = (changed[:, 6:] % (N_ITEMS - 1)) + 1
    before, after = model.encode(items, lengths), model.encode(changed, lengths)
    assert torch.allclose(before[:, :6], after[:, :6], rtol=0, atol=1e-12)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def differs(a, b):
    # At initialisation the time branch moves the output by ~1e-7; float64 noise is ~1e-16.
    return (a - b).abs().max().item() > 1e-9


def test_time_gaps_change_the_scores_and_masking_switch():
    model = make_model()
    items, lengths, times = make_batch()
    # Same items at other times: the gaps of the full-length row 0 reversed.
    gaps = torch.diff(times[0], prepend=times[0, :1])
    other = times.clone()
    other[0] = times[0, 0] + gaps.flip(0).cumsum(0) - gaps[-1]
    assert differs(model(items, lengths, times)[0], model(items, lengths, other)[0])

    masked = make_model(time_mask_padding=True)
    masked.load_state_dict(model.state_dict())
    other_padding = times.clone()
    other_padding[times == 0] = 5.0e8  # what padded slots hold must not matter when masked
    assert torch.allclose(masked(items, lengths, times), masked(items, lengths, other_padding),
                          rtol=0, atol=1e-12)
    assert differs(model(items, lengths, times), model(items, lengths, other_padding))


@pytest.mark.parametrize("overrides,dataset_has_time,message", [
    (dict(head_dim=12), True, "head_dim"),
    (dict(chunk_size=6), True, "power of two"),
    (dict(), False, "is_time needs the time field"),
    (dict(loss_type="BPR"), True, "CE only"),
    (dict(last_position_only="yes"), True, "last_position_only must be True or False"),
    (dict(skip_padding=1), True, "skip_padding must be True or False"),
    (dict(fused=None), True, "fused must be True or False"),
    (dict(ssd_backend="triton"), True, "triton cannot run"),
])
def test_bad_hyperparameters_fail_at_construction(overrides, dataset_has_time, message):
    with pytest.raises(ValueError, match=message):
        TiM4Rec(make_config(**overrides), FakeDataset(dataset_has_time))


triton_gpu = pytest.mark.skipif(not torch.cuda.is_available() or ssd_triton_reason() is not None,
                                reason="needs CUDA and mamba-ssm's Triton kernels")


@triton_gpu
@pytest.mark.parametrize("with_residual", [True, False])
def test_layer_ends_fused_equal_the_modules_with_the_kernels_mask(with_residual):
    """A layer's dropout, residual and LayerNorm on the GPU, training: the fused kernel's output and
    gradients equal the modules' applied with the mask of its seed (the same generator state drawn
    again); in evaluation, the modules' output."""
    from torch import nn

    from kernels.dropout import draw_seed, dropout_mask
    from tim4rec import dropout_add_layer_norm

    torch.manual_seed(0)
    dropout, norm = nn.Dropout(0.2).train(), nn.LayerNorm(64, eps=1e-12).cuda()
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    x = torch.randn(32, 50, 64, device="cuda", requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True) if with_residual else None
    leaves = [t for t in (x, residual, norm.weight, norm.bias) if t is not None]
    weights = torch.randn_like(x)

    def outputs_and_grads(fn):
        for t in leaves:
            t.grad = None
        out = fn()
        (out * weights).sum().backward()
        return [out.detach()] + [t.grad.clone() for t in leaves]

    torch.manual_seed(7)
    fused = outputs_and_grads(lambda: dropout_add_layer_norm(x, residual, dropout, norm, True))
    torch.manual_seed(7)
    keep = dropout_mask(draw_seed("cuda"), x.shape, 0.2)
    plain = outputs_and_grads(
        lambda: norm(x * keep / 0.8 + (0 if residual is None else residual)))
    for a, b in zip(fused, plain, strict=True):
        assert rel_err(a, b) < 1e-5
    dropout.eval()
    with torch.no_grad():
        assert rel_err(dropout_add_layer_norm(x, residual, dropout, norm, True),
                       dropout_add_layer_norm(x, residual, dropout, norm, False)) < 1e-6


@triton_gpu
@pytest.mark.parametrize("case,packed", [("movie_64d", False), ("without_time", False),
                                         ("movie_64d", True)])
def test_triton_model_matches_torch_model_on_gpu(case, packed):
    """Same weights and batch: the Triton path's scores and loss gradient equal the PyTorch path's,
    and both equal those of the plain model on the CPU in float64 (on the GPU, the FFN is recomputed
    in backward and the Triton path's SSD block runs as one FusedSSDBlock, each dropout, residual
    and LayerNorm as one kernel, and the last layer computes its position-wise part at the scored
    position only; on the CPU, at every position of the padded batch). ``packed``: the GPU models
    compute at the real positions only, in a fixed number of slots (as the captured step does)."""
    overrides = dict(PARITY_CASES[case], device=torch.device("cuda"), MAX_ITEM_LIST_LENGTH=50,
                     hidden_size=64, d_state=32, head_dim=32, chunk_size=32, recompute=True)
    models = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        models[backend] = TiM4Rec(make_config(ssd_backend=backend, **overrides),
                                  FakeDataset()).cuda().eval()
    models["triton"].load_state_dict(models["torch"].state_dict())
    on_cpu = {**overrides, "device": torch.device("cpu"), "ssd_backend": "torch",
              "last_position_only": False, "skip_padding": False}
    models["cpu"] = TiM4Rec(make_config(**on_cpu), FakeDataset()).to(torch.float64).eval()
    models["cpu"].load_state_dict(models["torch"].state_dict())
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 51, (64,), generator=g)
    pad = torch.arange(50) >= lengths[:, None]
    items = torch.randint(1, N_ITEMS, (64, 50), generator=g).masked_fill(pad, 0)
    times = ((1e9 + torch.randint(60, 10**6, (64, 50), generator=g).cumsum(1)).float()
             .masked_fill(pad, 0))
    batch = {"item_id_list": items.cuda(), "item_length": lengths.cuda(),
             "timestamp_list": times.cuda(), "item_id": torch.randint(1, N_ITEMS, (64,)).cuda()}
    scores, grads = {}, {}
    for backend, model in models.items():
        on = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        size = int(lengths.sum()) + 100 if packed and backend != "cpu" else None
        with model.fixed_pack_size(size):
            scores[backend] = model.full_sort_predict(on).float().cpu()
            model.calculate_loss(on).backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()
                                    if p.grad is not None]).float().cpu()
    assert rel_err(scores["triton"], scores["torch"]) < 1e-4
    assert rel_err(scores["torch"], scores["cpu"]) < 1e-4
    assert rel_err(grads["torch"], grads["cpu"]) < 1e-4
    assert rel_err(grads["triton"], grads["torch"]) < 1e-2  # TF32 inside the Triton kernels
