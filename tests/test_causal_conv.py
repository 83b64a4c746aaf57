"""kernels/causal_conv.py (Triton) against its PyTorch reference, on the CPU and on a GPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd import triton_unavailable_reason
from tests.causal_conv_checks import fused_block_errors, kernel_errors

CHECKS = Path(__file__).with_name("causal_conv_checks.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_kernels_match_reference_in_float64_on_the_cpu():
    """Forward, the three gradients and the fused block that calls them, through Triton's
    interpreter (which must be chosen before triton is imported: a process of its own)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(CHECKS)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) > 20
    assert all(err < 1e-12 for err in errors.values()), errors


@pytest.mark.skipif(not torch.cuda.is_available() or triton_unavailable_reason() is not None,
                    reason="needs CUDA and Triton")
def test_kernels_match_reference_on_gpu():
    errors = {**kernel_errors("cuda", torch.float32), **fused_block_errors("cuda", torch.float32)}
    print(errors)
    assert all(err < 1e-5 for err in errors.values()), errors


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_tensors_beyond_32_bit_offsets_are_refused():
    """The kernels address with 32-bit offsets: a larger tensor is a clear error, not a wrong read."""
    from kernels.causal_conv import causal_conv_act, causal_conv_act_bwd

    rows = torch.empty((70000, 200, 324), device="meta")  # in_proj's output at 64d, L 200
    x, weight, bias = rows[..., :192], torch.empty(192, 1, 4), torch.empty(192)
    with pytest.raises(ValueError, match="32-bit offsets"):
        causal_conv_act(x, weight, bias)
    x = x[:6000]  # fits; its gradient's rows in a much wider tensor do not
    dx = torch.empty((6000, 200, 2000), device="meta")[..., :192]
    with pytest.raises(ValueError, match="32-bit offsets"):
        causal_conv_act_bwd(x, weight, bias, torch.empty(x.shape, device="meta"), dx=dx)
