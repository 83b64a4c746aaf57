"""One (model, L) of the sequence-length study: the process that ``bench/length_study.py`` starts
for each cell, so that one running out of memory ends only its own cell.

    python bench/length_step.py --child=MODEL --length=L --work=DIR --child-out=OUT.json
        [--data_path DIR] [--dataset ml-1m-half] [--config_file config4movie_64d.yaml]
        [--device cuda|cpu] [--steps 20] [--warmup 3] [--paths eager,graph] [--wait]

``--work`` is the study's folder: ``dataset.pkl`` (the loaded dataset) and ``batches-L.pt`` (the
batches of L, :func:`common.draw_batches`). It builds MODEL's config through the project's
pipeline (``config/<config_file>`` with the model's own file over it, ``MAX_ITEM_LIST_LENGTH`` = L,
the batches' size as ``train_batch_size``) and times, on fresh weights each (the model's seed), the
step as the project's trainer takes it (zero_grad, forward, backward, Adam):

- ``eager``: outside a graph; on a GPU TiM4Rec's batch stays padded, as in the trainer's eager step;
- ``graph`` (GPU only): the step captured as a CUDA graph and replayed (:mod:`pipeline.cuda_graph`),
  TiM4Rec's batches packed into the slots that the trainer would fix from the samples' lengths.

Before its first step, a path's Triton kernels are compiled side by side, as the trainer does
(:mod:`pipeline.precompile`); the first step (which autotunes mamba-ssm's kernels where this
machine has no choice for them yet) is timed apart. Then ``--warmup`` steps, and the median of
``--steps`` steps, each between two CUDA events; the steps cycle through the batches. Peak memory:
the most GPU memory allocated after the first step (warm-up, capture and timed steps; autotuning
holds a benchmark buffer of its own). ``--device cpu`` times the eager step with the host's clock
and no memory: a smoke test. It writes the cell's JSON to ``--child-out``, with ``default``: the
step the trainer takes on one ``device`` (``cuda_graph: auto``).

``--wait``: take turns with the study. Once loaded (imports, config, batches) it says ``ready`` on
its stdout and waits for ``go`` on its stdin; after its first step it waits once more, for a line
that says the next cell has loaded, so that loading overlaps this cell's first step and not the
steps it times.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import pickle
import sys
from pathlib import Path

from common import DATA_PATH, error_text, median_ms, model_config, sync_seconds


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


def time_path(make_model, config, batches, path: str, pool_lengths, steps: int, device: str,
              quiet=lambda: None, warmup: int = 3) -> dict:
    """First step (s), median step (ms) and peak memory (GB) of one path on fresh weights;
    ``quiet()`` is called between the first step and the rest."""
    import torch

    from pipeline import cuda_graph, precompile

    model = make_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    packed, step = None, None
    if path == "graph":
        packed = cuda_graph.packed_size_for(model, pool_lengths, len(batches[0]))
        if packed is not None and not all(packed.fits(b) for b in batches):
            raise RuntimeError(f"a timed batch does not fit {packed.size} packed slots")
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
            row["compile_error"] = error_text(error)
    try:
        row["first_s"], _ = sync_seconds(run, device)
        quiet()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        warmup = warmup if device == "cuda" else 1  # on the CPU only a smoke test
        for _ in range(warmup + (cuda_graph.WARMUP_STEPS + 1 if step else 0)):
            run()
        if step is not None and (step.failed or step.graph is None):
            raise RuntimeError(f"capture failed: {step.failed or 'not captured'}")
        row["step_ms"] = median_ms(run, steps, device)
        if device == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    finally:
        if step is not None:
            step.release()
    return row


def child(args) -> int:
    """Time one (model, L); with ``--wait``, take turns with the study (see the module
    docstring)."""
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
    config, model_class = model_config(name, args.config_file, {
        "dataset": args.dataset, "data_path": args.data_path, "MAX_ITEM_LIST_LENGTH": length,
        "train_batch_size": data["batch"], "show_progress": False,
        "use_gpu": args.device == "cuda"})
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
                            args.device, quiet, args.warmup)
        except Exception as error:  # noqa: BLE001 - whatever stops a path is its cell's entry
            row = {"error": error_text(error)}
        result["rows"][path] = row
        print(f"length_step: {name} L {length} {path}: {json.dumps(row)}", file=sys.stderr,
              flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    Path(args.child_out).write_text(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", required=True, metavar="MODEL", help="the model to time")
    parser.add_argument("--length", type=int, required=True, help="L")
    parser.add_argument("--work", required=True, help="the study's folder of batches")
    parser.add_argument("--child-out", required=True, help="write the cell's JSON here")
    parser.add_argument("--data_path", default=str(DATA_PATH))
    parser.add_argument("--dataset", default="ml-1m-half")
    parser.add_argument("--config_file", default="config4movie_64d.yaml")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--paths", default="eager,graph")
    parser.add_argument("--wait", action="store_true", help="take turns with the study")
    args = parser.parse_args(argv)
    args.data_path = str(Path(args.data_path).resolve())
    return child(args)


if __name__ == "__main__":
    sys.exit(main())
