"""The benchmark control bench/sasrec_sdpa.py: RecBole's SASRec with its attention through
scaled_dot_product_attention holds SASRec's parameters and computes its scores and gradients
(float64, CPU, a batch with padding), with RecBole's mask semantics."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from recbole.model.layers import MultiHeadAttention
from recbole.model.sequential_recommender.sasrec import SASRec

from tests.conftest import ROOT

LENGTH = 12  # the tiny users have 8..16 interactions: the training batch is partly padding


def _load_sdpa():
    name = "sasrec_sdpa"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "sasrec_sdpa.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


sdpa = _load_sdpa()
VARIANTS = (sdpa.SASRecSDPA, sdpa.SASRecSDPACausal)


@pytest.fixture(scope="module")
def setup(tiny_data_path):
    """SASRec's config through the project's pipeline, the tiny dataset, one training batch."""
    from recbole.data import create_dataset, data_preparation

    from pipeline.settings import build_config

    config, spec = build_config("SASRec", [], {
        "dataset": "tiny", "data_path": str(tiny_data_path), "MAX_ITEM_LIST_LENGTH": LENGTH,
        "train_batch_size": 64, "use_gpu": False, "show_progress": False, "state": "WARNING"})
    assert spec.model_class is SASRec
    train_data, _, _ = data_preparation(config, create_dataset(config))
    batch = next(iter(train_data))
    lengths = batch["item_length"]
    assert (lengths < LENGTH).any() and (lengths == LENGTH).any()  # padded and full rows
    return config, train_data._dataset, batch


def make(model_class, setup, **changes):
    from recbole.utils import init_seed

    config, dataset, _ = setup
    saved = {key: config[key] for key in changes}
    for key, value in changes.items():
        config[key] = value
    try:
        init_seed(config["seed"], config["reproducibility"])
        return model_class(config, dataset)
    finally:
        for key, value in saved.items():
            config[key] = value


def without_dropout(model_class, setup, reference=None):
    """A float64 model with every dropout at 0, holding ``reference``'s weights if given."""
    model = make(model_class, setup, hidden_dropout_prob=0.0, attn_dropout_prob=0.0).double()
    if reference is not None:
        model.load_state_dict(reference.state_dict())
    return model.train()


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_parameters_and_initial_weights(setup, variant):
    ours, theirs = make(variant, setup).state_dict(), make(SASRec, setup).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    layer = make(variant, setup).trm_encoder.layer[0]
    assert isinstance(layer.multi_head_attention, sdpa.SDPAttention)


@pytest.mark.parametrize("variant", VARIANTS)
def test_scores_and_gradients_equal_recboles(setup, variant):
    batch = setup[2]
    theirs = without_dropout(SASRec, setup)
    theirs.item_embedding.weight.data.normal_(0, 1.0)  # larger than the init: scores far from 0
    ours = without_dropout(variant, setup, reference=theirs)
    for model in (theirs, ours):
        model.zero_grad(set_to_none=True)
        model.calculate_loss(batch).backward()
    assert torch.allclose(ours.calculate_loss(batch), theirs.calculate_loss(batch), rtol=1e-12)
    with torch.no_grad():
        scores = ours.full_sort_predict(batch)
        assert torch.allclose(scores, theirs.full_sort_predict(batch), rtol=1e-11, atol=1e-11)
    assert scores.std() > 0.1  # the comparison is not of near-zero scores
    gradients = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        expected = gradients[name].grad
        if expected is None:  # parameters that do not reach the loss in either model
            assert param.grad is None, name
            continue
        assert torch.allclose(param.grad, expected, rtol=1e-10, atol=1e-12), name


def _encoder_outputs(model, batch):
    seen = []
    handle = model.trm_encoder.register_forward_hook(lambda _m, _i, out: seen.append(out[-1]))
    try:
        with torch.no_grad():
            model.forward(batch["item_id_list"], batch["item_length"])
    finally:
        handle.remove()
    return seen[0]  # [B, L, D]


def test_every_position_equal_with_recboles_mask(setup):
    batch = setup[2]
    theirs = without_dropout(SASRec, setup)
    theirs_out = _encoder_outputs(theirs, batch)
    ours_out = _encoder_outputs(without_dropout(sdpa.SASRecSDPA, setup, reference=theirs), batch)
    assert torch.allclose(ours_out, theirs_out, rtol=1e-11, atol=1e-11)  # padded positions too


def test_causal_mask_alone_equals_at_real_positions_only(setup):
    batch = setup[2]
    theirs = without_dropout(SASRec, setup)
    theirs_out = _encoder_outputs(theirs, batch)
    ours_out = _encoder_outputs(without_dropout(sdpa.SASRecSDPACausal, setup, reference=theirs),
                                batch)
    real = batch["item_id_list"] != 0  # right padding: the first item_length positions
    assert torch.allclose(ours_out[real], theirs_out[real], rtol=1e-11, atol=1e-11)
    assert not torch.allclose(ours_out[~real], theirs_out[~real])  # padded queries: keys differ


def test_fully_masked_query_follows_recboles_fill(setup):
    """A query whose keys are all masked (a sequence padded on its left, which RecBole never
    builds): RecBole's -10000 gives a softmax over its raw scores; so does the additive mask."""
    torch.manual_seed(0)
    theirs = MultiHeadAttention(8, 64, 0.0, 0.0, 1e-12).double()
    ours = MultiHeadAttention(8, 64, 0.0, 0.0, 1e-12).double()
    ours.load_state_dict(theirs.state_dict())
    ours.__class__ = sdpa.SDPAttention
    item_seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    mask = make(SASRec, setup).get_attention_mask(item_seq)  # [B, 1, L, L], 0 or -10000
    assert (mask[0, 0, :2] == -10000).all()  # the first two queries of row 0 see no real key
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    expected = theirs(x, mask)
    got = ours(x, mask)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_dropout_is_attn_dropout_prob_in_training(setup, variant, monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["dropout_p"], kwargs["attn_mask"] is None, kwargs["is_causal"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = make(variant, setup)
    config, _, batch = setup
    assert config["attn_dropout_prob"] > 0  # SASRec's baseline settings
    model.train().calculate_loss(batch)
    model.eval().calculate_loss(batch)
    causal = variant is sdpa.SASRecSDPACausal
    n_layers = config["n_layers"]
    assert calls == ([(config["attn_dropout_prob"], causal, causal)] * n_layers
                     + [(0.0, causal, causal)] * n_layers)
