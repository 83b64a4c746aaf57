"""Training step time and peak GPU memory against the sequence length L, at a fixed number of
positions per batch, for TiM4Rec and the baselines.

    python bench/length_study.py [--data_path DIR] [--lengths 50,100,200,400,800,1600]
        [--tokens 102400] [--models TiM4Rec,SASRec,SASRec-sdpa,Mamba4Rec,LRURec,SSD4Rec]
        [--fill full|real] [--paths eager,graph] [--steps 20] [--json OUT.json] [--png OUT.png]
        [--device cuda|cpu]

**Models**, each at the project's settings for it (64d, 2 layers): ``config/config4movie_64d.yaml``
(the ML-1M setting) with a baseline's ``baseline/<Name>/config.yaml`` over it, built through the
project's pipeline (``pipeline.settings.build_config``, ``pipeline.registry.find_model``) with
``MAX_ITEM_LIST_LENGTH`` = L and ``train_batch_size`` = tokens // L. ``SASRec-sdpa`` is RecBole's
SASRec at its settings with the attention through ``scaled_dot_product_attention`` and RecBole's
causal and padding mask (``bench/sasrec_sdpa.py``); ``SASRec-sdpa-causal`` (not in the default
list) the same with the causal mask alone, which gives the same scores for right-padded sequences.

**Batches**, from ``DIR/ml-1m-half``: its interactions as RecBole loads them for training (users
and items with at least 5 interactions, ids remapped, timestamps as RecBole's float32, each user's
history sorted by time), and RecBole's training samples at L: for a user with n interactions, the
interaction at position t, for t = 1 .. n - 3 (the last two are the validation and test targets),
is the target, and the up to L interactions before it, items and timestamps, are the input, padded
with 0 on the right. ``--fill`` picks among the samples:

- ``full`` (the default): those with exactly L inputs, that is windows of L consecutive
  interactions of one user and the next one as target. Every position of a batch is real, so a
  step's cost is that of length L. The windows of one user overlap, and the longest lengths draw
  on the few users with that many interactions (the JSON says from how many users each L's
  batches come).
- ``real``: all of them: the lengths that training at L sees, ever more padding as L grows.

For each L the parent draws 4 batches of tokens // L samples at random (seed 0; without
replacement within a batch, unless there are fewer samples than that) and writes them once to a
temporary folder, with the loaded dataset, for the children; a child's steps cycle through them.

**Each (model, L) runs in its own process**, so that one running out of memory ends only its own
cell. The next child imports and loads during the current one's first step (not during the steps
it times), and touches the GPU only in its turn. A child times, on fresh weights each (the model's
seed), the step as the project's trainer takes it (zero_grad, forward, backward, Adam):

- ``eager``: outside a graph; on a GPU TiM4Rec's batch stays padded, as in the trainer's eager step;
- ``graph`` (GPU only): the step captured as a CUDA graph and replayed (:mod:`pipeline.cuda_graph`),
  TiM4Rec's batches packed into the slots that the trainer would fix from the samples' lengths.

Before its first step, a path's Triton kernels are compiled side by side, as the trainer does
(:mod:`pipeline.precompile`); the first step (which autotunes mamba-ssm's kernels where this
machine has no choice for them yet) is timed apart. Then warm-up steps, and the median of
``--steps`` steps, each between two CUDA events. Peak memory: the most GPU memory allocated after
the first step (warm-up, capture and timed steps; autotuning holds a benchmark buffer of its own).
``--device cpu`` times the eager step with the host's clock and no memory: a smoke test.

**Outputs**: a Markdown table of every path; each model's step time over TiM4Rec's at each L; the
log-log slope of each model's step time against L, least squares over L >= 200 (at a fixed number
of positions, 0 is a cost per position that does not grow with L, 1 one that grows as L); and,
printed last, the main table: each model's default step on one GPU (``cuda_graph: auto``: the graph
for TiM4Rec, SASRec, its variants and Mamba4Rec; eager for LRURec and SSD4Rec), a cell per L, step
ms / peak GB, or what stopped it ("out of memory"). ``--json`` writes every number (after every
child, so a study cut short keeps what it measured); ``--png`` draws step time and peak memory
against L, log-log, one line per model.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = "ml-1m-half"
CONFIG_FILE = "config4movie_64d.yaml"  # the 64d, 2-layer setting; baselines' files go over it
LENGTHS = (50, 100, 200, 400, 800, 1600)
TOKENS = 102_400  # batch 2048 at L 50, the paper's batch, down to 64 at L 1600
MODELS = ("TiM4Rec", "SASRec", "SASRec-sdpa", "Mamba4Rec", "LRURec", "SSD4Rec")
VARIANTS = ("SASRec-sdpa", "SASRec-sdpa-causal")  # from SASRec's config: bench/sasrec_sdpa.py
PATHS = ("eager", "graph")
BATCHES = 4  # distinct batches per L, cycled through
WARMUP = 3  # steps after the first, before timing (a graph needs its own warm-up and capture too)
SLOPE_FROM = 200  # the slope is fitted over L >= this
BELOW_FROM = 400  # TiM4Rec's step against the SASRecs' over L >= this
CHILD_TIMEOUT_S = 300
OUT_OF_MEMORY = "out of memory"


# --------------------------------------------------------------------------------------------------
# Batches (the parent)
# --------------------------------------------------------------------------------------------------


def load_interactions(data_path: str, name: str = DATASET):
    """The dataset ``name`` as RecBole loads it for training, before its training samples are
    built (a RecBole dataset, which model constructors read), and its interactions as arrays in
    each user's time order: ``(dataset, {"user", "item", "time"})``."""
    import numpy as np
    from recbole.data import create_dataset

    from pipeline.settings import CONFIG_DIR, build_config

    config, _ = build_config("TiM4Rec", [CONFIG_DIR / CONFIG_FILE], {
        "dataset": name, "data_path": data_path, "use_gpu": False, "show_progress": False})
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
    """RecBole's training samples at ``length`` (see the module docstring) of interactions sorted
    by user and time: ``(target index, input length)`` arrays, with ``fill`` full only those of
    exactly ``length`` inputs."""
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


def draw_batches(arrays: dict, length: int, batch: int, fill: str, seed: int = 0) -> dict:
    """``BATCHES`` batches of ``batch`` training samples at ``length``, as tensors: items and
    timestamps [BATCHES, batch, length] (right-padded with 0), lengths and targets [BATCHES, batch],
    the number of users they come from, and the lengths of every sample they were drawn from
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
                      for _ in range(BATCHES)])  # [BATCHES, batch]
    chosen_target, chosen_length = target[picks], lengths[picks]
    items, times = inputs(arrays, chosen_target, chosen_length, length)
    out.update({
        "items": torch.from_numpy(items), "times": torch.from_numpy(times),
        "lengths": torch.from_numpy(chosen_length.astype(np.int64)),
        "targets": torch.from_numpy(arrays["item"][chosen_target].astype(np.int64)),
        "users": int(len(np.unique(arrays["user"][chosen_target]))),
    })
    return out


def inputs(arrays: dict, target, lengths, length: int):
    """The items (int64) and timestamps (float32) before each ``target`` index, ``lengths`` of
    them, right-padded with 0 to ``length``: arrays of ``target``'s shape plus [length]."""
    import numpy as np

    offsets = np.arange(length)
    real = offsets < lengths[..., None]
    index = np.where(real, target[..., None] - lengths[..., None] + offsets, 0)
    return (np.where(real, arrays["item"][index], 0).astype(np.int64),
            np.where(real, arrays["time"][index], 0).astype(np.float32))


def prepare(data_path: str, lengths, tokens: int, fill: str, work: Path) -> dict:
    """Write the dataset and each L's batches under ``work``; what each L's batches are."""
    import torch

    dataset, arrays = load_interactions(data_path)
    with open(work / "dataset.pkl", "wb") as handle:
        pickle.dump(dataset, handle)
    info = {}
    for length in lengths:
        batch = max(1, tokens // length)
        data = draw_batches(arrays, length, batch, fill)
        torch.save(data, work / f"batches-{length}.pt")
        pool = data["pool_lengths"]
        info[length] = {"batch": batch, "samples": len(pool)}
        if "items" in data:
            info[length].update({
                "real_fraction": float(data["lengths"].double().mean()) / length,
                "samples_real_fraction": float(pool.double().mean()) / length,
                "users": data["users"]})
    return info


# --------------------------------------------------------------------------------------------------
# One (model, L): the child
# --------------------------------------------------------------------------------------------------


def model_config(name: str, length: int, batch: int, data_path: str, device: str):
    """The config of ``name`` at ``length`` through the project's pipeline, and its class."""
    from pipeline.settings import CONFIG_DIR, build_config

    base = "SASRec" if name in VARIANTS else name
    config, spec = build_config(base, [CONFIG_DIR / CONFIG_FILE], {
        "dataset": DATASET, "data_path": data_path, "MAX_ITEM_LIST_LENGTH": length,
        "train_batch_size": batch, "show_progress": False, "use_gpu": device == "cuda"})
    if name in VARIANTS:
        from sasrec_sdpa import SASRecSDPA, SASRecSDPACausal

        return config, {"SASRec-sdpa": SASRecSDPA, "SASRec-sdpa-causal": SASRecSDPACausal}[name]
    return config, spec.model_class


def default_path(config, device: str) -> str:
    """The step that the project's trainer takes on one ``device`` (``cuda_graph`` and the rest of
    ``config``, :func:`pipeline.cuda_graph.reason_not_captured`)."""
    import torch

    from pipeline import cuda_graph

    if device != "cuda":
        return "eager"
    probe = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # the trainer's optimizer kind
    reason = cuda_graph.reason_not_captured(
        config["cuda_graph"], config["model"], False, probe,
        clip_grad_norm=config["clip_grad_norm"])
    return "graph" if reason is None else "eager"


def _error_text(error: BaseException) -> str:
    import torch

    text = " ".join(str(error).split())
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return OUT_OF_MEMORY
    return f"{type(error).__name__}: {text}"[:200]


def _median_ms(run, calls: int, device: str) -> float:
    if device == "cuda":
        from gpu_speed import median_cuda_ms

        return median_cuda_ms(run, calls)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_path(make_model, config, batches, path: str, pool_lengths, steps: int, device: str,
              quiet=lambda: None) -> dict:
    """First step (s), median step (ms) and peak memory (GB) of one path on fresh weights;
    ``quiet()`` is called between the first step and the rest."""
    import torch

    from pipeline import cuda_graph, precompile

    model = make_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    packed, step = None, None
    if path == "graph":
        size_for = getattr(model, "pack_size_for", None)  # as cuda_graph.packed_size reads it
        size = size_for(pool_lengths, len(batches[0])) if size_for else None
        packed = None if size is None else cuda_graph.PackedSize(model, size)
        if packed is not None and not all(packed.fits(b) for b in batches):
            raise RuntimeError(f"a timed batch does not fit {size} packed slots")
        step = cuda_graph.GraphedStep(model.calculate_loss, optimizer, len(batches[0]),
                                      packed=packed)

        def run_one(batch):
            step(batch)
    else:
        def run_one(batch):
            optimizer.zero_grad(set_to_none=True)
            model.calculate_loss(batch).backward()
            optimizer.step()

    cycle = itertools.cycle(batches)

    def run():
        run_one(next(cycle))

    row = {}
    device_ = torch.device(device)
    if precompile.wanted(device_, config["compile_ahead"]):
        try:  # as the trainer does before its first step; a failure only costs time
            done = precompile.compile_step(model, batches[0],
                                           train_inside=packed.fixed if packed else None)
            row["compiled_kernels"], row["compile_s"] = done["kernels"], done["compile_s"]
        except Exception as error:  # noqa: BLE001
            row["compile_error"] = _error_text(error)
    try:
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        row["first_s"] = time.perf_counter() - start
        quiet()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        warmup = WARMUP if device == "cuda" else 1  # on the CPU only a smoke test
        for _ in range(warmup + (cuda_graph.WARMUP_STEPS + 1 if step else 0)):
            run()
        if step is not None and (step.failed or step.graph is None):
            raise RuntimeError(f"capture failed: {step.failed or 'not captured'}")
        row["step_ms"] = _median_ms(run, steps, device)
        if device == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    finally:
        if step is not None:
            step.release()
    return row


def child(args) -> int:
    """Time one (model, L); with ``--wait``, take turns with the parent (see :class:`Child`)."""
    import os

    if args.wait:
        # Every other write to stdout, from Python or a library, goes to stderr: stdout carries
        # only the line that says this child has loaded, which the parent waits for.
        ready = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    import torch
    from recbole.data.interaction import Interaction
    from recbole.utils import init_seed

    from pipeline.runlog import environment

    work, name, length = Path(args.work), args.child, args.length
    data = torch.load(work / f"batches-{length}.pt", weights_only=True)
    config, model_class = model_config(name, length, data["batch"], args.data_path, args.device)
    with open(work / "dataset.pkl", "rb") as handle:
        dataset = pickle.load(handle)  # written by this study's parent
    item, time_, suffix = config["ITEM_ID_FIELD"], config["TIME_FIELD"], config["LIST_SUFFIX"]
    cpu_batches = [Interaction({item + suffix: data["items"][k],
                                config["ITEM_LIST_LENGTH_FIELD"]: data["lengths"][k],
                                item: data["targets"][k], time_ + suffix: data["times"][k]})
                   for k in range(len(data["items"]))]
    result = {"model": name, "length": length, "batch": data["batch"],
              "default": default_path(config, args.device), "rows": {}}
    if args.wait:
        ready.write("ready\n")
        ready.close()
        if sys.stdin.readline().strip() != "go":
            return 1  # the study stopped before this child's turn
    waited = []

    def quiet():  # once: the next child has loaded, and stays idle until this one ends
        if args.wait and not waited:
            waited.append(sys.stdin.readline())

    def make_model():
        init_seed(config["seed"], config["reproducibility"])
        model = model_class(config, dataset).to(torch.device(args.device))
        for key in ("backend", "ssd_backend"):  # which scan runs (Mamba4Rec: mamba-ssm's or not)
            if isinstance(getattr(model, key, None), str):
                result[key] = getattr(model, key)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        return model

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(
        config["enable_tf32"])
    result["environment"] = environment(args.device)
    batches = [b.to(args.device) for b in cpu_batches]
    for path in args.paths.split(","):
        if path == "graph" and args.device != "cuda":
            continue
        try:
            row = time_path(make_model, config, batches, path, data["pool_lengths"], args.steps,
                            args.device, quiet)
        except Exception as error:  # noqa: BLE001 - whatever stops a path is its cell's entry
            row = {"error": _error_text(error)}
        result["rows"][path] = row
        print(f"length_study: {name} L {length} {path}: {json.dumps(row)}", file=sys.stderr,
              flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    Path(args.child_out).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------
# The parent: children in turn, and the report
# --------------------------------------------------------------------------------------------------


class Child:
    """The process of one (model, L). It loads (imports, config, batches), says so on its stdout
    and waits for ``go``; then it builds and times its model, and waits once more, for ``quiet``,
    between its first step and the steps it times. :func:`study` starts the next child when it
    sends ``go`` to this one, and sends ``quiet`` once that one has loaded: loading overlaps
    this child's first step, not the steps it times."""

    def __init__(self, model: str, length: int, work: Path, args):
        self.model, self.length = model, length
        self.out = work / f"result-{model}-{length}.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), f"--child={model}",
             f"--length={length}", f"--work={work}", f"--child-out={self.out}", "--wait",
             f"--data_path={args.data_path}", f"--device={args.device}",
             f"--steps={args.steps}", f"--paths={args.paths}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.loaded = False

    def wait_loaded(self) -> None:
        if not self.loaded:
            self.proc.stdout.readline()  # "ready", or nothing where it failed while loading
            self.loaded = True

    def send(self, word: str) -> None:
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it has ended: its exit code says how

    def result(self) -> dict:
        try:
            code = self.proc.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
        finally:
            self.close()
        if self.out.is_file():
            return json.loads(self.out.read_text())
        return {"error": f"its process failed (exit code {code})"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # a write still buffered for a child that has gone


def study(args, work: Path, models, lengths, info: dict, on_result) -> list[dict]:
    """Every (model, L), one after another (see :class:`Child`); ``on_result(results)`` after
    each. An L without samples (``info``) gets that as its cells' entry."""
    results = [{"model": model, "length": length, "error": "no sample of that length"}
               for length in lengths if "real_fraction" not in info[length] for model in models]
    jobs = [(model, length) for length in lengths if "real_fraction" in info[length]
            for model in models]
    current, pending = None, Child(*jobs[0], work, args) if jobs else None
    try:
        for index in range(len(jobs)):
            current = pending
            current.wait_loaded()
            current.send("go")
            pending = Child(*jobs[index + 1], work, args) if index + 1 < len(jobs) else None
            if pending is not None:
                pending.wait_loaded()
            current.send("quiet")
            result = current.result()
            result.setdefault("model", current.model)
            result.setdefault("length", current.length)
            results.append(result)
            on_result(results)
    finally:
        for child_ in (current, pending):
            if child_ is not None:
                child_.stop()
    return results


def chosen_row(result: dict) -> tuple[str | None, dict]:
    """The path shown for a result, and its row: the model's default step where it was timed."""
    rows = result.get("rows", {})
    if "error" in result:
        return None, {"error": result["error"]}
    path = result.get("default")
    if path not in rows:
        path = next(iter(rows), None)
    return path, rows.get(path, {"error": "not timed"})


def loglog_slope(points: dict[int, float], from_length: int = SLOPE_FROM) -> float | None:
    """Least-squares slope of log(value) against log(L) over L >= ``from_length``."""
    pairs = [(math.log(L), math.log(v)) for L, v in points.items() if L >= from_length and v > 0]
    if len(pairs) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in pairs)
    mean_y = statistics.fmean(y for _, y in pairs)
    sxx = sum((x - mean_x) ** 2 for x, _ in pairs)
    return sum((x - mean_x) * (y - mean_y) for x, y in pairs) / sxx if sxx else None


def _cell(row: dict) -> str:
    if "error" in row:
        error = row["error"].removeprefix("RuntimeError: ").replace("|", "/")
        return error if len(error) <= 60 else error[:57] + "..."
    peak = row.get("peak_gb")
    return f"{row['step_ms']:.1f} ms" + (f" / {peak:.2f} GB" if peak is not None else "")


def _ran_out(result: dict | None) -> bool:
    return result is not None and chosen_row(result)[1].get("error") == OUT_OF_MEMORY


def summarize(results: list[dict], models, lengths) -> dict:
    """Per model: the shown path, the step ms of each L where it ran, and the slope."""
    summary = {}
    for model in models:
        paths, steps = set(), {}
        for r in results:
            if r["model"] == model:
                path, row = chosen_row(r)
                paths.add(path)
                if "step_ms" in row:
                    steps[r["length"]] = row["step_ms"]
        summary[model] = {"path": "/".join(sorted(p for p in paths if p)) or "-",
                          "step_ms": steps, "slope": loglog_slope(steps)}
    return summary


def markdown(results: list[dict], models, lengths, info: dict, summary: dict) -> str:
    by_key = {(r["model"], r["length"]): r for r in results}
    head = "| {} | " + " | ".join(f"L {L} (batch {info[L]['batch']})" for L in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    lines = ["Every path (step ms / peak GB):", "", head.format("model, path"), rule]
    for model in models:
        for path in PATHS:
            cells = [by_key.get((model, L), {}).get("rows", {}).get(path) for L in lengths]
            if any(cells):
                lines.append(f"| {model}, {path} | "
                             + " | ".join(_cell(c) if c else "-" for c in cells) + " |")
    base = summary.get("TiM4Rec", {}).get("step_ms", {})
    if base:
        lines += ["", "Step time over TiM4Rec's (each model's default step):", "",
                  head.format("model"), rule]
        for model in models:
            ms = summary[model]["step_ms"]
            lines.append(f"| {model} | " + " | ".join(
                f"{ms[L] / base[L]:.2f}" if L in ms and L in base else "-" for L in lengths) + " |")
    lines += ["", f"Log-log slope of step time against L (least squares over L >= {SLOPE_FROM}):"]
    for model in models:
        slope = summary[model]["slope"]
        lines.append(f"- {model} ({summary[model]['path']}): "
                     + (f"{slope:.2f}" if slope is not None else "-"))
    tim4rec = summary.get("TiM4Rec", {})
    controls = [m for m in models if m.startswith("SASRec") and summary[m]["step_ms"]]
    if tim4rec.get("slope") is not None and controls:
        over = [L for L in lengths if L >= BELOW_FROM and L in tim4rec["step_ms"]]
        below = over and all(L in summary[m]["step_ms"] or _ran_out(by_key.get((m, L)))
                             for m in controls for L in over) and all(
            tim4rec["step_ms"][L] < summary[m]["step_ms"][L]
            for m in controls for L in over if L in summary[m]["step_ms"])
        lines.append(f"- TiM4Rec: slope {tim4rec['slope']:.2f}; its step shorter than "
                     f"{' and '.join(controls)}'s at every L >= {BELOW_FROM} (out of memory "
                     f"counts as longer): {'yes' if below else 'no'}")
    lines += ["", "Main table: each model's default step, step ms / peak GB (the batch at each L "
              "in its column's head):", "", head.format("model (step)"), rule]
    for model in models:
        cells = []
        for L in lengths:
            r = by_key.get((model, L))
            cells.append(_cell(chosen_row(r)[1]) if r else "-")
        lines.append(f"| {model} ({summary[model]['path']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], models, path: Path) -> None:
    """Step time and peak memory against L, log-log, one line per model (its default step)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in models:
        points = sorted((r["length"], chosen_row(r)[1]) for r in results if r["model"] == model)
        for ax, key in ((left, "step_ms"), (right, "peak_gb")):
            xy = [(L, row[key]) for L, row in points if row.get(key) is not None]
            if xy:
                shown = "/".join(sorted({chosen_row(r)[0] or "-" for r in results
                                         if r["model"] == model}))
                ax.plot(*zip(*xy), marker="o", label=f"{model} ({shown})")
    left.set(xlabel="sequence length L", ylabel="training step (ms)", xscale="log", yscale="log")
    right.set(xlabel="sequence length L", ylabel="peak GPU memory (GB)", xscale="log",
              yscale="log")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="small")
    fig.suptitle("fixed positions per batch (batch x L)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default=str(ROOT.parent / "shared" / "datasets"),
                        help=f"folder holding {DATASET}/ (default: ../shared/datasets)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--tokens", type=int, default=TOKENS,
                        help="positions per batch: batch = tokens // L")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"any of {', '.join(MODELS + VARIANTS[1:])}, or another project model")
    parser.add_argument("--fill", choices=("full", "real"), default="full",
                        help="full: every input exactly L long; real: training's lengths at L")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="eager, graph or both; graph on a GPU only")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data_path = str(Path(args.data_path).resolve())
    if args.child:
        return child(args)

    lengths, models = _int_list(args.lengths), [m for m in args.models.split(",") if m]
    if not lengths or min(lengths) < 1 or args.tokens < 1 or args.steps < 1:
        parser.error("--lengths, --tokens and --steps must be positive")
    if unknown := [p for p in args.paths.split(",") if p not in PATHS]:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    if not (Path(args.data_path) / DATASET / f"{DATASET}.inter").is_file():
        parser.error(f"no {DATASET}/{DATASET}.inter under {args.data_path}")
    from pipeline.errors import UserError
    from pipeline.registry import find_model

    for model in models:
        if model not in VARIANTS:
            try:
                find_model(model)
            except UserError as error:
                parser.error(str(error))

    with tempfile.TemporaryDirectory(prefix="length-study-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        info = prepare(args.data_path, lengths, args.tokens, args.fill, work)
        print(f"length_study: batches ready in {time.perf_counter() - start:.1f} s: "
              f"{json.dumps(info)}", file=sys.stderr, flush=True)
        settings = {"dataset": DATASET, "config": CONFIG_FILE, "tokens": args.tokens,
                    "fill": args.fill, "lengths": lengths, "models": models, "paths": args.paths,
                    "steps": args.steps, "warmup": WARMUP, "batches_per_length": BATCHES,
                    "device": args.device}

        def write(results):
            if args.json:
                envs = [r["environment"] for r in results if "environment" in r]
                args.json.write_text(json.dumps({
                    "environment": envs[0] if envs else None, "settings": settings,
                    "batches": info, "results": results,
                    "summary": summarize(results, models, lengths)}, indent=1))

        results = study(args, work, models, lengths, info, write)
    summary = summarize(results, models, lengths)
    if args.png:
        plot(results, models, args.png)
    envs = [r["environment"] for r in results if "environment" in r]
    if envs:
        print(json.dumps(envs[0]))
    print(f"length_study: {time.perf_counter() - start:.0f} s in all", file=sys.stderr)
    print(markdown(results, models, lengths, info, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
