"""What the benchmark scripts share; the only module of bench/ that another one imports.

- **Settings**: the paper's three efficiency settings (a) Amazon-Sports, L 50, 64d, batch 2048;
  (b) ML-1M users 1-2999 (``ml-1m-half``), L 200, 64d, batch 2048; (c) the same data, L 200, 256d,
  batch 512; configs and models built through the project's pipeline, the benchmark-only SASRec
  variants of ``bench/sasrec_sdpa.py`` included.
- **Timing**: a function's seconds between device synchronisations, the median GPU time of calls
  between CUDA events (the host's clock on a CPU), a training step's first and median time and peak
  memory (eager or as the trainer's CUDA graph), GPU time by kind of kernel (torch.profiler).
- **Agreement**: a model's loss, full-sort scores and gradients against the same weights in
  float64.
- **Batches at any L**: RecBole's training samples of a dataset, built from its interactions
  without RecBole's data augmentation, so that long L fit in memory.
- **Processes**: a GPU script's setup (RecBole's anomaly detection off, the environment), a child
  process of a script that hands back JSON, training runs of ``run.py`` and their results files,
  and what stopped a step ("out of memory").
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT, ROOT / "bench"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

DATA_PATH = ROOT.parent / "shared" / "datasets"  # the shared atomic files, beside the checkout
SETTINGS = {  # name: (config file, dataset)
    "a": ("config4beauty_64d.yaml", "amazon-sports"),
    "b": ("config4movie_64d.yaml", "ml-1m-half"),
    "c": ("config4movie_256d.yaml", "ml-1m-half"),
}
SDPA_MODELS = ("SASRec-sdpa", "SASRec-sdpa-causal")  # SASRec's config: bench/sasrec_sdpa.py
OUT_OF_MEMORY = "out of memory"


# --------------------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------------------


def model_config(model: str | None, config_file: str, overrides: dict):
    """``(config, model class)`` of ``model`` (None: the config file's) through the project's
    pipeline, ``config_file`` under ``config/`` and the model's own file over it; the
    :data:`SDPA_MODELS` from SASRec's config."""
    from pipeline.settings import CONFIG_DIR, build_config

    base = "SASRec" if model in SDPA_MODELS else model
    config, spec = build_config(base, [CONFIG_DIR / config_file], overrides)
    if model in SDPA_MODELS:
        from sasrec_sdpa import SASRecSDPA, SASRecSDPACausal

        return config, {"SASRec-sdpa": SASRecSDPA, "SASRec-sdpa-causal": SASRecSDPACausal}[model]
    return config, spec.model_class


def setting_config(model: str | None, setting: str, data_path, **overrides):
    """``(config, model class)`` of ``model`` at one of the :data:`SETTINGS`."""
    config_file, dataset = SETTINGS[setting]
    return model_config(model, config_file, {"dataset": dataset, "data_path": str(data_path),
                                             "show_progress": False, **overrides})


def setting_data(config):
    """``(dataset, train_data, test_data, first training batch)`` of ``config``, on the CPU."""
    from recbole.data import create_dataset, data_preparation

    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    return dataset, train_data, test_data, next(iter(train_data))


def seeded_model(model_class, config, dataset, device="cuda", seed=None, **changes):
    """``model_class`` on ``device`` with ``changes`` to a copy of ``config``, its weights drawn
    from ``seed`` (default: the config's seed, as the pipeline draws them)."""
    import torch
    from recbole.utils import init_seed

    if changes:
        config = copy.deepcopy(config)
        for key, value in changes.items():
            config[key] = value
    init_seed(config["seed"] if seed is None else seed, config["reproducibility"])
    return model_class(config, dataset).to(torch.device(device))


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def synchronize(device="cuda") -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def sync_seconds(fn, device="cuda"):
    """``(seconds, result)`` of ``fn()``, between two synchronisations of ``device``."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median_ms(run, calls: int = 20, device="cuda", warmup: int = 0) -> float:
    """The median time (ms) of ``calls`` calls of ``run`` after ``warmup`` untimed ones: on a GPU
    each between two CUDA events, elsewhere by the host's clock."""
    import torch

    for _ in range(warmup):
        run()
    times = []
    for _ in range(calls):
        if str(device).startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def time_steps(model, batch, graph: bool, anomaly: bool, steps=20, warmup=5,
               profile_kernels=False, train_data=None, amp=False) -> dict:
    """First step (s), median step (ms) and peak memory (GB) of zero_grad, loss, backward, Adam on
    one GPU batch; with ``profile_kernels``, the GPU time per step of each kind of kernel too. A
    graph packs the batch's real positions as the trainer's does, into slots fixed from
    ``train_data``. ``anomaly``: autograd anomaly detection on, as RecBole runs its models. ``amp``:
    the forward under bfloat16 autocast, as the trainer runs it with ``enable_amp``."""
    import torch

    from pipeline import precision
    from pipeline.cuda_graph import WARMUP_STEPS, GraphedStep, packed_size

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if graph:
        packed = packed_size(model, train_data, len(batch))
        if packed is not None and not packed.fits(batch):
            raise RuntimeError(f"the timed batch does not fit {packed.size} slots")
        step = GraphedStep(model.calculate_loss, optimizer, len(batch), packed=packed)

        def run():
            with precision.autocast("cuda", amp):
                return step(batch)
    else:
        def run():
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast("cuda", amp):
                loss = model.calculate_loss(batch)
            loss.backward()
            optimizer.step()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.set_detect_anomaly(anomaly)
    try:
        first, _ = sync_seconds(run)
        for _ in range(max(warmup, WARMUP_STEPS + 2)):
            run()
        step_ms = median_ms(run, steps)
    finally:
        torch.autograd.set_detect_anomaly(False)
    if graph and step.failed:
        raise RuntimeError(f"capture failed: {step.failed}")
    row = {"first_s": first, "step_ms": step_ms,
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    if profile_kernels:
        row["kernel_ms"], row["top_kernels_ms"] = kernel_times(run)
    return row


KERNEL_KINDS = (  # (kind, words of a kernel's name), the first match wins; else "elementwise"
    ("SSD (mamba-ssm Triton)", ("_chunk", "_bmm_chunk", "_state_passing")),
    ("gated RMSNorm (Triton)", ("_layer_norm_fwd", "_layer_norm_bwd", "_gated_norm")),
    ("item embedding gradient", ("_embedding_grad", "sum_and_scatter", "compute_grad_weight")),
    ("cumulative sum", ("tensor_kernel_scan",)),
    ("convolution", ("conv",)),
    ("dropout + residual + LayerNorm (Triton)", ("_add_norm",)),
    ("Hardswish + dropout (Triton)", ("_act_dropout",)),
    ("GEMM", ("gemm", "gemv", "xmma", "cutlass")),
    ("LayerNorm", ("layer_norm",)),
    ("softmax / loss", ("softmax", "nll")),
    ("Adam", ("multi_tensor", "adam")),
    ("cat / copy", ("cat", "copy")),
    ("reduction", ("reduce",)),
)


def kernel_times(run, steps=3, top=15) -> tuple[dict, dict]:
    """GPU time per step (ms) of each kind of kernel (:data:`KERNEL_KINDS`), and of the ``top``
    longest kernels, from torch.profiler over ``steps`` calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        ms = event.self_device_time_total / 1e3 / steps
        if ms <= 0:
            continue
        name = event.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)),
                    "elementwise")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        kernels[event.key[:100]] = kernels.get(event.key[:100], 0.0) + ms
    longest = sorted(kernels.items(), key=lambda item: -item[1])[:top]
    return dict(sorted(kinds.items(), key=lambda item: -item[1])), dict(longest)


# --------------------------------------------------------------------------------------------------
# Agreement with float64
# --------------------------------------------------------------------------------------------------


def relative_error(a, b) -> float:
    """``|a - b| / |b|`` (norms), ``b`` the float64 reference."""
    return ((a.double() - b).norm() / b.norm()).item()


def loss_scores_grads(model, batch):
    """The loss, the full-sort scores and every parameter's gradient of ``model`` on ``batch``."""
    import torch

    model.zero_grad(set_to_none=True)
    loss = model.calculate_loss(batch)
    loss.backward()
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), scores, grads


def errors_against_float64(build, backends, reference_backend, batch) -> dict:
    """Relative errors of each backend (float32) against ``reference_backend`` in float64, on the
    same weights and batch, dropout off. ``build(backend)`` returns the model, the same weights
    every call; per backend: loss, scores, the median and the worst parameter's gradient."""
    import torch

    reference = build(reference_backend).double().eval()
    ref_loss, ref_scores, ref_grads = loss_scores_grads(reference, batch)
    del reference
    out = {}
    for backend in backends:
        loss, scores, grads = loss_scores_grads(build(backend).eval(), batch)
        grad_errors = {n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}
        worst = max(grad_errors, key=grad_errors.get)
        out[backend] = {"loss": relative_error(loss, ref_loss),
                        "scores": relative_error(scores, ref_scores),
                        "grads_median": statistics.median(grad_errors.values()),
                        "grads_max": grad_errors[worst], "grads_max_param": worst}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------------
# Batches of RecBole's training samples at any L
# --------------------------------------------------------------------------------------------------


def load_interactions(config_file: str, data_path, name: str):
    """The dataset ``name`` as RecBole loads it for training (``config_file``'s filters), before
    its training samples are built (a RecBole dataset, which model constructors read), and its
    interactions as arrays in each user's time order: ``(dataset, {"user", "item", "time"})``."""
    import numpy as np
    from recbole.data import create_dataset

    from pipeline.settings import CONFIG_DIR, build_config

    config, _ = build_config("TiM4Rec", [CONFIG_DIR / config_file], {
        "dataset": name, "data_path": str(data_path), "use_gpu": False, "show_progress": False})
    dataset = create_dataset(config)
    # The list fields' types, which model constructors read (TiM4Rec checks the time list), as
    # RecBole's data augmentation declares them, without building every training sample at every
    # position: at L 1600 those would fill gigabytes.
    dataset._aug_presets()
    frame = dataset.inter_feat
    user = frame[dataset.uid_field].to_numpy()
    time_ = frame[dataset.time_field].to_numpy().astype(np.float32)  # RecBole keeps float32
    # RecBole's order: by user, then time, stable (ties keep the file's order).
    order = np.lexsort((time_, user))
    arrays = {"user": user[order], "item": frame[dataset.iid_field].to_numpy()[order],
              "time": time_[order]}
    return dataset, arrays


def training_samples(user, length: int, fill: str):
    """RecBole's training samples at ``length`` of interactions sorted by user and time: for a
    user with n interactions, the one at position t = 1 .. n - 3 is a target (the last two are the
    validation and test targets) and the up to ``length`` before it its input. ``(target index,
    input length)`` arrays; with ``fill`` "full" only those of exactly ``length`` inputs."""
    import numpy as np

    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    position = np.arange(len(user)) - np.repeat(starts, counts)  # within the user's history
    last_train = np.repeat(counts - 3, counts)  # the last training target's position
    target = np.flatnonzero((position >= 1) & (position <= last_train))
    lengths = np.minimum(position[target], length)
    if fill == "full":
        keep = lengths == length
        target, lengths = target[keep], lengths[keep]
    return target, lengths


def inputs(arrays: dict, target, lengths, length: int):
    """The items (int64) and timestamps (float32) before each ``target`` index, ``lengths`` of
    them, right-padded with 0 to ``length``: arrays of ``target``'s shape plus [length]."""
    import numpy as np

    offsets = np.arange(length)
    real = offsets < lengths[..., None]
    index = np.where(real, target[..., None] - lengths[..., None] + offsets, 0)
    return (np.where(real, arrays["item"][index], 0).astype(np.int64),
            np.where(real, arrays["time"][index], 0).astype(np.float32))


def draw_batches(arrays: dict, length: int, batch: int, fill: str, count: int,
                 seed: int = 0) -> dict:
    """``count`` batches of ``batch`` training samples at ``length``, drawn at random (without
    replacement within a batch, unless there are fewer samples), as tensors: items and timestamps
    [count, batch, length] (right-padded with 0), lengths and targets [count, batch], the number
    of users they come from, and the lengths of every sample they were drawn from
    (``pool_lengths``), from which the trainer would fix TiM4Rec's packed slots. Without ``items``
    where there is no sample."""
    import numpy as np
    import torch

    target, lengths = training_samples(arrays["user"], length, fill)
    out = {"pool_lengths": torch.from_numpy(lengths.astype(np.int64)), "batch": batch}
    if len(target) == 0:
        return out
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(len(target), batch, replace=len(target) < batch)
                      for _ in range(count)])  # [count, batch]
    chosen_target, chosen_length = target[picks], lengths[picks]
    items, times = inputs(arrays, chosen_target, chosen_length, length)
    out.update({
        "items": torch.from_numpy(items), "times": torch.from_numpy(times),
        "lengths": torch.from_numpy(chosen_length.astype(np.int64)),
        "targets": torch.from_numpy(arrays["item"][chosen_target].astype(np.int64)),
        "users": len(np.unique(arrays["user"][chosen_target])),
    })
    return out


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def gpu_environment(script: str) -> dict:
    """A GPU script's start: RecBole's process-wide anomaly detection off (as the project runs),
    exit where there is no CUDA device; the environment to record with the figures."""
    from pipeline import compat

    compat.apply()
    import torch

    from pipeline.runlog import environment

    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA device")
    return environment("cuda")


def run_json_child(script, args: list[str], env: dict | None = None) -> dict:
    """``python script ARGS --child-out=FILE`` in a fresh process (``env`` over this one's), and
    the JSON that it wrote to FILE."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    try:
        subprocess.run([sys.executable, str(script), *args, f"--child-out={out}"], check=True,
                       env={**os.environ, **(env or {})})
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def start_run(args: list[str], log_dir: Path) -> subprocess.Popen:
    """``python run.py ARGS`` writing its log and results file under ``log_dir``."""
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"--log_dir={log_dir}",
                             "--show_progress=False", *args], cwd=ROOT)


def run_results(log_dir: Path) -> dict:
    """The results file (``log/<model>/<run>.json``) that the run under ``log_dir`` wrote."""
    (path,) = Path(log_dir).rglob("*.json")
    return json.loads(path.read_text())


def publish(lines: list[str], data, json_path=None) -> None:
    """Print a Markdown table and, with ``json_path``, write ``data`` beside it."""
    print("\n".join(lines))
    write_json(json_path, data)


def write_json(path, data) -> None:
    """``data`` as indented JSON at ``path``, if one is given."""
    if path:
        Path(path).write_text(json.dumps(data, indent=1))


def error_text(error: BaseException) -> str:
    """What stopped a step, short: :data:`OUT_OF_MEMORY`, or the error's type and message."""
    import torch

    text = " ".join(str(error).split())
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return OUT_OF_MEMORY
    return f"{type(error).__name__}: {text}"[:200]
