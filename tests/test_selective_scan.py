"""Mamba-1's selective scan: the PyTorch scan (baseline/Mamba4Rec/scan.py) and the Triton kernels
(kernels/selective_scan.py) against the step-by-step reference, on a CPU and a GPU."""

import importlib.util
from pathlib import Path

import pytest
import torch

from baseline.Mamba4Rec import scan
from kernels.selective_scan_ref import selective_scan_ref
from tests.conftest import interpreted_errors
from tests.numerics import rel_err
from tests.selective_scan_checks import scan_inputs

CHECKS = Path(__file__).with_name("selective_scan_checks.py")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton installed")


def outputs_and_grads(fn, inputs, dy):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, leaves, dy)


@pytest.mark.parametrize("batch, length, channels, states, rows", [
    (2, 13, 5, 16, 2), (1, 1, 3, 32, 1), (3, 19, 7, 32, 2), (5, 50, 9, 4, 3), (4, 2, 6, 8, 4)])
def test_chunked_scan_matches_reference(batch, length, channels, states, rows, monkeypatch):
    """y and the seven gradients in float64, with the batch in blocks of ``rows`` rows (the last
    one shorter where it does not divide the batch)."""
    monkeypatch.setattr(scan, "BLOCK_ELEMENTS", rows * channels * states)
    inputs, dy = scan_inputs(batch, length, channels, states)
    y, grads = outputs_and_grads(scan.selective_scan_chunked, inputs, dy)
    ref, ref_grads = outputs_and_grads(selective_scan_ref, inputs, dy)
    assert rel_err(y, ref) < 1e-13
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(grad, ref_grad) < 1e-13


@pytest.mark.parametrize("length, chunk", [(1, 1), (2, 2), (4, 2), (5, 3), (50, 8), (200, 15)])
def test_chunk_length_is_the_ceiling_of_sqrt(length, chunk):
    assert scan.chunk_length(length) == chunk


def test_chunked_scan_keeps_only_its_inputs():
    """What the node keeps for backward: the seven inputs themselves (no copies), no state."""
    inputs, _ = scan_inputs(3, 50, 6, 4)
    leaves = [t.clone().requires_grad_() for t in inputs]
    kept = scan.selective_scan_chunked(*leaves).grad_fn.saved_tensors
    assert len(kept) == len(leaves)
    assert all(k.data_ptr() == t.data_ptr() for k, t in zip(kept, leaves, strict=True))


@needs_triton
def test_triton_scan_matches_reference_in_float64_on_the_cpu():
    """Forward and every gradient of the kernels (several shapes), and the Mamba-1 block on them,
    through Triton's interpreter (chosen before triton is imported: a process of its own)."""
    errors = interpreted_errors(CHECKS)
    assert len(errors) > 80
    assert all(err < 1e-12 for err in errors.values()), errors


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and Triton")
def test_triton_scan_matches_float64_reference_on_gpu():
    """float32 kernels against the float64 reference, at the paper's shapes too."""
    from tests.selective_scan_checks import all_errors

    errors = all_errors("cuda", torch.float32)
    print(errors)
    assert all(err < 1e-4 for err in errors.values()), errors


@needs_triton
def test_triton_scan_refuses_what_it_cannot_compute():
    """Shapes that do not match, a strided last axis, too many states, a chunk that is not a power
    of two, states of another chunk, beyond 32-bit offsets: a clear error before any launch."""
    from kernels.selective_scan import selective_scan_bwd, selective_scan_fwd

    def inputs(batch=2, length=10, channels=8, states=4, device="meta"):
        x = torch.empty(batch, length, channels, device=device)
        bc = torch.empty(batch, length, 2 * states, device=device)
        return [x, x, torch.empty(channels, states, device=device), bc[..., :states],
                bc[..., states:], torch.empty(channels, device=device),
                torch.empty(channels, device=device)]

    good = inputs()
    for position, bad, match in [
            (1, torch.empty(2, 9, 8, device="meta"), "one shape"),
            (2, torch.empty(8, 300, device="meta"), "N <= 256"),
            (3, torch.empty(2, 10, 5, device="meta"), "B and C"),
            (5, torch.empty(7, device="meta"), "D and dt_bias"),
            (0, torch.empty(2, 8, 10, device="meta").transpose(1, 2), "contiguous last axis")]:
        args = list(good)
        args[position] = bad
        with pytest.raises(ValueError, match=match):
            selective_scan_fwd(*args)
    with pytest.raises(ValueError, match="power of two"):
        selective_scan_fwd(*good, chunk=6)
    with pytest.raises(ValueError, match="states must be"):
        selective_scan_bwd(*good, torch.empty(2, 3, 4, 8, device="meta"), good[0], chunk=4)
    with pytest.raises(ValueError, match="32-bit offsets"):
        selective_scan_fwd(*inputs(batch=70000, length=200, channels=256, states=16))
