"""Compile the Triton kernels of a step in parallel before the step first runs.

Triton compiles each kernel the first time it is launched, one after another in the launching
thread: a cold first training step of TiM4Rec spends about 20 s in some thirty compilations (this
project's kernels and mamba-ssm's, forward and backward). Each compilation is independent, so this
module collects them first and compiles them side by side:

1. **A dry pass.** The step runs once with every Triton launch suppressed: Triton's
   ``jit_cache_hook`` is called before each compilation with everything the compilation needs, and
   answering True skips both the compilation and the launch. The hook records the request instead.
   PyTorch's own operations run as usual, on whatever the skipped kernels left in their outputs;
   nothing of the dry pass is kept (see below). Where mamba-ssm's autotuner has no choice yet, the
   dry pass records the compilation of each candidate configuration and leaves the choice unmade.
2. **Parallel compilation.** Threads compile the recorded kernels into the process's kernel
   caches (and Triton's on-disk cache), and load them on the GPU (:func:`compile_requests`). The
   real step then finds them compiled and loaded.

What the dry pass leaves untouched: the random number generators (forked and restored, so a run's
dropout masks do not depend on whether it compiled ahead), the autotuners' choices (new keys are
removed again, their benchmark is a no-op meanwhile) and the model (:func:`compile_step` runs the
dry pass on a copy). What it changes: only when kernels are compiled, never what a kernel computes.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)


def wanted(device, setting) -> bool:
    """Whether a run on ``device`` with ``compile_ahead: setting`` compiles ahead: on CUDA devices
    where Triton is installed, unless the setting is off."""
    return (device.type == "cuda" and bool(setting)
            and importlib.util.find_spec("triton") is not None)


def default_workers() -> int:
    """The pool size: the CPUs this process may use, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


@contextlib.contextmanager
def _undecided_autotuners():
    """While inside, mamba-ssm's autotuners make no choice: each call whose key has no choice yet
    runs every candidate configuration, and forgets what it picked.

    Each call, not only the first of a key: a kernel called from two places with the same key but
    other strides is compiled separately for each, and the configuration the real step will choose
    is not known yet, so every candidate must be compiled for each. Their benchmark only calls the
    kernel once (a launch that the dry pass suppresses).
    """
    from pipeline import autotune

    tuners = list(autotune._autotuners().values())
    saved = [(tuner, tuner.cache_results) for tuner in tuners]

    def call_once(kernel_call, quantiles=None):
        kernel_call()
        return [0.0, 0.0, 0.0]

    def forgetful(tuner):
        def run(*args, **kwargs):
            known = set(tuner.cache)
            try:
                return type(tuner).run(tuner, *args, **kwargs)
            finally:
                for key in set(tuner.cache) - known:
                    del tuner.cache[key]
        return run

    for tuner in tuners:  # instance attributes: they shadow the class's methods
        tuner.__dict__["do_bench"] = call_once
        tuner.__dict__["run"] = forgetful(tuner)
        tuner.cache_results = False  # nothing of the dry pass on disk either
    try:
        yield
    finally:
        for tuner, cache_results in saved:
            tuner.__dict__.pop("do_bench", None)
            tuner.__dict__.pop("run", None)
            tuner.cache_results = cache_results


def record_compilations(run) -> list[tuple]:
    """Call ``run()`` with every Triton compilation and launch suppressed; the compilations it
    asked for, as ``(JITFunction, specialization data)``, each once.

    Kernels already compiled in this process are launched as usual (on the dry pass's data).
    """
    from triton import knobs

    requests = {}

    def record(*, key, fn, compile, **_):
        requests.setdefault((id(fn.jit_function), key),
                            (fn.jit_function, compile["specialization_data"]))
        return True  # neither compile nor launch

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = record
    try:
        with _undecided_autotuners():
            run()
    finally:
        knobs.runtime.jit_cache_hook = previous
    return list(requests.values())


def compile_requests(requests: list[tuple], workers: int) -> int:
    """Compile ``requests`` (from :func:`record_compilations`) with ``workers`` threads, and load
    each kernel on the current CUDA device.

    Part of Triton's compiler runs outside the Python interpreter's lock (the MLIR and LLVM passes,
    ptxas), so threads compile side by side, though not fully in parallel; worker processes, which
    must each start and import first, were no faster (BENCHMARKS.md, section First step). Loading a
    kernel builds its launcher, a small C module compiled once per kernel signature; that too is
    left to the threads. A kernel that fails to compile or load here is skipped: its first launch
    compiles it again and raises where it always would (an autotuner then discards that
    candidate, as usual). Returns the number of kernels that failed to compile.
    """
    import torch
    from triton import AsyncCompileMode

    device = torch.cuda.current_device()

    def load(kernel):
        torch.cuda.set_device(device)  # the thread's current device: where the kernel is loaded
        try:
            kernel._init_handles()  # what the first launch would do: launcher and binary
        except Exception as error:  # noqa: BLE001 (raised again by the launch itself)
            logger.debug("Triton: %s not loaded ahead: %s", kernel.name, error)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        with AsyncCompileMode(pool, ignore_errors=True):
            pending = [jit_function.preload(data) for jit_function, data in requests]
        kernels = [p.result(ignore_errors=True) for p in pending]  # all finished by now
        compiled = [k for k in kernels if k is not None]
        for (jit_function, _), p in zip(requests, pending):
            if p.future.exception() is not None:
                logger.debug("Triton: %s did not compile ahead: %s", jit_function,
                             p.future.exception())
        list(pool.map(load, compiled))
    return len(kernels) - len(compiled)


def compile_ahead(run, workers: int | None = None) -> dict:
    """Compile, in parallel, the Triton kernels that ``run()`` launches; what was done, as
    ``{"kernels": n, "failed": n, "dry_s": s, "compile_s": s}`` (``failed``: kernels that did not
    compile, such as autotune candidates too large for the GPU).

    ``run`` is called once, with launches suppressed and the CPU and current CUDA device's random
    number generators restored after; it must not depend on values that Triton kernels compute
    (a training step's forward and backward do not).
    """
    import torch

    workers = default_workers() if workers is None else workers
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        requests = record_compilations(run)
    dry = time.perf_counter()
    failed = compile_requests(requests, workers)
    done = time.perf_counter()
    return {"kernels": len(requests), "failed": failed, "dry_s": dry - start,
            "compile_s": done - dry}


def compile_step(model, interaction, amp: bool = False, workers: int | None = None,
                 train: bool = True, train_inside=None) -> dict:
    """:func:`compile_ahead` for ``model``'s training step on ``interaction`` (a batch on the
    model's device): forward and backward of its loss, and its full-sort scores in eval mode, so
    that the first validation finds its kernels too; with ``train`` False, the scores only (a run
    that only evaluates). ``train_inside(model)``: a context for the training part (the shapes
    of a captured step, :class:`pipeline.cuda_graph.PackedSize`), or None. ``amp``: the training
    step's forward in bfloat16 autocast, as the trainer runs it with ``enable_amp``
    (:mod:`pipeline.precision`); its kernels are compiled for those dtypes. Scoring runs without
    autocast, as evaluation does.

    The dry pass runs on a copy of the model, which is then dropped: the model's gradients,
    buffers and mode stay as they were, and autograd hooks on its parameters (those of
    DistributedDataParallel) do not fire.
    """
    import torch

    from pipeline import precision

    shadow = copy.deepcopy(model).train()

    def run():
        if train:
            inside = train_inside(shadow) if train_inside else contextlib.nullcontext()
            with inside:
                with precision.autocast("cuda", amp):
                    loss = shadow.calculate_loss(interaction)
                loss.backward()
        shadow.eval()
        try:
            with torch.no_grad():
                shadow.full_sort_predict(interaction)
        except NotImplementedError:  # a model without full-sort scores
            pass

    return compile_ahead(run, workers)  # the copy goes with this frame
