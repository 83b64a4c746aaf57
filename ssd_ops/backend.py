"""Which SSD backend runs: mamba-ssm's Triton kernels, loaded without its package ``__init__``, or
the PyTorch scan.

mamba-ssm (every release up to 2.3.2.post1) imports its compiled Mamba-1 extension from the package
``__init__``, so with a Triton-only install (no CUDA build) ``import mamba_ssm`` fails. The Triton
modules themselves need no compiled code: :func:`triton_modules` imports them without running the
package ``__init__``.

``ssd_backend`` (``auto|triton|torch``) is the user's choice; :func:`resolve_backend` turns it into
the backend that runs, and :func:`uses_triton` says, per tensor, whether the Triton kernels run.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import logging
import sys
import types

import torch

BACKENDS = ("auto", "triton", "torch")

logger = logging.getLogger(__name__)


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
    """Whether ``backend`` (auto|triton|torch) runs mamba-ssm's Triton kernels for the tensor
    ``x``."""
    if backend == "auto":
        return x.is_cuda and triton_unavailable_reason() is None
    return backend == "triton"


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Turn ``auto|triton|torch`` into the backend that runs on ``device`` (never silently).

    ``auto`` picks Triton on CUDA when mamba-ssm's kernels load, else PyTorch, with a warning on
    CUDA.
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
        logger.warning("mamba-ssm Triton kernels unavailable (%s); using the PyTorch SSD scan",
                       reason)
    return "torch"

