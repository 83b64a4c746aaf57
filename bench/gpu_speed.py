"""GPU training speed of TiM4Rec against RecBole's SASRec (the control) and Mamba4Rec; the floor.

    python bench/gpu_speed.py --data_path=DIR [--settings a,b,c] [--models TiM4Rec,SASRec,Mamba4Rec]
        [--json OUT.json] [--quick] [--profile]

DIR holds amazon-sports/ and ml-1m-half/. Settings (upstream's configs):
(a) amazon-sports, L 50, 64d, batch 2048; (b) ml-1m-half, L 200, 64d, batch 2048;
(c) ml-1m-half, L 200, 256d, batch 512.

Each setting runs in its own process, on one real batch and the real data loaders:

- **step**: median over 20 training steps (zero_grad, forward, backward, Adam) after warm-up, timed
  with CUDA events, and the peak GPU memory over them. Per model: ``eager`` (the step as RecBole's
  trainer runs it), ``graph`` (this project's default on one GPU: :mod:`pipeline.cuda_graph`); for
  TiM4Rec also ``graph, recompute`` (the FFN's hidden layer computed again in backward), ``graph,
  unfused`` (``fused: False``: the SSD block as separate modules, not one
  :class:`~ssd_ops.fused_block.FusedSSDBlock`, and dropout, residual and LayerNorm as separate
  modules), ``graph, every position`` (``last_position_only: False``: the last layer's position-wise
  part at every position, not only the scored one), ``graph, padded`` (``skip_padding: False``:
  every position of the padded batch, not only the real ones), ``graph, chunk 64`` (the scan in
  chunks of 64 steps: the same function, other kernel shapes), ``graph, TF32`` (opt-in: changes
  float32 results) and ``graph, bf16`` (``enable_amp``: the forward under bfloat16 autocast, as the
  trainer runs it; SASRec has this row too, and the tables give each model's bf16 step over its
  float32 one). The control is SASRec (the paper's settings: 8 heads) ``eager + anomaly``: RecBole
  turns on autograd anomaly detection for the whole process when its model package is imported
  (SINE's module does it), so that is how RecBole runs SASRec; this project turns it off
  (:mod:`pipeline.compat`), and ``eager`` without it is shown too. A graph packs the batch's real
  positions as the trainer's does (TiM4Rec's ``skip_padding``); ``eager`` keeps them padded.
- **epoch**: one training epoch through the project's trainer (the second one: the first captures
  the graph), and for the control one epoch of RecBole's own ``Trainer._train_epoch``;
  ``loading``: one pass over the training loader with the batches copied to the GPU, no model.
- **eval**: full-sort evaluation of the test set through the trainer.
- **first step**: TiM4Rec's first training step in a fresh process, with fresh Triton and autotune
  caches, as the trainer takes it: its kernels compiled side by side first
  (:mod:`pipeline.precompile`). ``cold``: the shipped autotune choices of ``config/autotune.json``
  apply on a GPU they name; ``cold, one by one``: each kernel compiled at its first launch instead
  (``compile_ahead: False``); ``cold, no shipped choices``: every kernel autotuned; ``warm``: again
  in the same caches (the same config already ran on this machine).
- **floor**: the step's FLOPs and the bytes it must move (written out in :func:`floor`), over the
  card's peak rates: how far each setting is from the hardware, and which of the two bounds it.

Prints Markdown tables; ``--json`` writes every number. ``--quick`` times TiM4Rec's epoch only
(not the other models' nor the control's, the longest part at (c)) and skips the first step without
shipped choices.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from common import (SETTINGS, gpu_environment, run_json_child, seeded_model, setting_config,
                    setting_data, sync_seconds, time_steps, write_json)

MODELS = ("TiM4Rec", "SASRec", "Mamba4Rec")

# Peak dense rates of an H100 SXM (NVIDIA's datasheet): FP32 on CUDA cores, TF32 on tensor cores
# (mamba-ssm's kernels multiply in TF32), HBM3 bandwidth.
PEAK = {"fp32_flops": 67e12, "tf32_flops": 495e12, "bytes": 3.35e12}
UPSTREAM = {  # reference section 5: upstream TiM4Rec and RecBole SASRec on one H100
    "a": {"step_ms": 22.1, "sasrec_ms": 38.0, "first_s": 13.9, "peak_gb": 2.0},
    "b": {"step_ms": 63.1, "sasrec_ms": 128.8, "first_s": 18.2, "peak_gb": 6.9},
    "c": {"step_ms": 62.6, "sasrec_ms": 84.9, "first_s": 78.7, "peak_gb": 6.7},
}


# --------------------------------------------------------------------------------------------------
# One process per setting
# --------------------------------------------------------------------------------------------------


def loading_seconds(train_data) -> float:
    """One pass over the training loader, each batch copied to the GPU, no model."""
    def one_pass():
        for interaction in train_data:
            interaction.to("cuda")
    return sync_seconds(one_pass)[0]


def project_epoch(config, model, train_data, test_data) -> dict:
    """Seconds of the project trainer's second epoch (the first captures the graph), and of a
    full-sort evaluation of the test set."""
    from pipeline.trainer import ProjectTrainer

    trainer = ProjectTrainer(config, model, None)
    trainer._train_epoch(train_data, 0)
    epoch_s, _ = sync_seconds(lambda: trainer._train_epoch(train_data, 1))
    eval_s, _ = sync_seconds(lambda: trainer.evaluate(test_data, load_best_model=False))
    return {"epoch_s": epoch_s, "eval_s": eval_s}


def recbole_epoch(config, model, train_data) -> float:
    """Seconds of one epoch of RecBole's own Trainer, anomaly detection on, as RecBole runs it."""
    import torch
    from recbole.trainer import Trainer

    from pipeline.trainer import tensorboard_in

    with tensorboard_in(None):
        trainer = Trainer(config, model)
    torch.autograd.set_detect_anomaly(True)
    try:
        return sync_seconds(lambda: trainer._train_epoch(train_data, 0))[0]
    finally:
        torch.autograd.set_detect_anomaly(False)


def child(setting: str, data_path: str, quick: bool, profile: bool, models=MODELS,
          skip=()) -> dict:
    import torch

    config, model_class = setting_config(None, setting, data_path)
    dataset, train_data, test_data, batch = setting_data(config)
    batch = batch.to("cuda")
    lengths = train_data.dataset.inter_feat[config["ITEM_LIST_LENGTH_FIELD"]]
    out = {"setting": setting, "dataset": SETTINGS[setting][1], "batch": len(batch),
           "length": config["MAX_ITEM_LIST_LENGTH"], "hidden": config["hidden_size"],
           "real_fraction": float(lengths.double().mean()) / config["MAX_ITEM_LIST_LENGTH"],
           "n_items": dataset.item_num, "batches": len(train_data),
           "train_samples": len(train_data.dataset), "loading_s": loading_seconds(train_data),
           "ssd": {k: config[k] for k in ("num_layers", "d_state", "d_conv", "expand", "head_dim",
                                          "chunk_size", "is_time")},
           "rows": {}}
    for name in models:
        # SASRec: the project's baseline config, the paper's (8 heads), not RecBole's default (2).
        model_config, model_class_ = (config, model_class) if name == "TiM4Rec" else (
            setting_config(name, setting, data_path))
        # (label, CUDA graph, anomaly detection, config changes)
        variants = [("eager", False, False, {}), ("graph", True, False, {})]
        if name == "SASRec":
            variants.insert(0, ("eager + anomaly", False, True, {}))
            variants.append(("graph, bf16", True, False, {"enable_amp": True}))
        if name == "TiM4Rec":  # what each of its step's settings changes
            variants += [("graph, recompute", True, False, {"recompute": True}),
                         ("graph, unfused", True, False, {"fused": False}),
                         ("graph, every position", True, False, {"last_position_only": False}),
                         ("graph, padded", True, False, {"skip_padding": False}),
                         ("graph, chunk 64", True, False, {"chunk_size": 64}),
                         ("graph, TF32", True, False, {"enable_tf32": True}),
                         ("graph, bf16", True, False, {"enable_amp": True})]
        for label, graph, anomaly, changes in [v for v in variants if v[0] not in skip]:
            saved = {key: model_config[key] for key in changes}
            for key, value in changes.items():  # for this row only
                model_config[key] = value
            model = seeded_model(model_class_, model_config, dataset)
            tf32 = bool(model_config["enable_tf32"])
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            try:
                row = time_steps(model, batch, graph, anomaly, train_data=train_data,
                                 profile_kernels=(profile and name == "TiM4Rec"
                                                  and label in ("graph", "graph, bf16")),
                                 amp=bool(model_config["enable_amp"]))
            except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
                row = {"error": " ".join(str(error).split())[:200]}
            # --quick: TiM4Rec's epoch only (the one the epoch bar is about).
            timed_epoch = (label == "graph" and name == "TiM4Rec") or (
                not quick and (graph or anomaly))
            if "error" not in row and timed_epoch:
                # Fresh weights and optimizer.
                model = seeded_model(model_class_, model_config, dataset)
                if anomaly:
                    row["epoch_s"] = recbole_epoch(model_config, model, train_data)
                else:
                    row.update(project_epoch(model_config, model, train_data, test_data))
            if name == "TiM4Rec" and label == "eager":
                from pipeline import autotune

                autotune.save()  # its kernel choices, for the next process on this machine
            if name == "Mamba4Rec":
                row["backend"] = model.backend  # mambapy's scan where mamba-ssm has no CUDA build
            for key, value in saved.items():
                model_config[key] = value
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            out["rows"][f"{name} {label}"] = row
            print(setting, name, label, json.dumps(row), file=sys.stderr, flush=True)
            del model
            torch.cuda.empty_cache()
    return out


def first_step_child(setting: str, data_path: str, shipped: bool, ahead: bool) -> dict:
    """TiM4Rec's first training step in this (fresh) process, as the trainer takes it: with
    ``ahead``, its kernels compiled side by side first (:mod:`pipeline.precompile`)."""
    import torch

    from pipeline import autotune, precompile
    from pipeline.cuda_graph import packed_size

    if not shipped:
        autotune.SHIPPED = None
    config, model_class = setting_config(None, setting, data_path)
    dataset, train_data, _, batch = setting_data(config)
    batch = batch.to("cuda")
    model = seeded_model(model_class, config, dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    packed = packed_size(model, train_data, len(batch))  # the captured step's shapes
    out = {}

    def step():
        if ahead:
            out.update(precompile.compile_step(model, batch,
                                               train_inside=packed.fixed if packed else None))
        optimizer.zero_grad(set_to_none=True)
        with packed.fixed() if packed else contextlib.nullcontext():
            model.calculate_loss(batch).backward()
        optimizer.step()
    out["first_s"], _ = sync_seconds(step)
    return out  # (the new choices are saved at exit, for the warm run)


# --------------------------------------------------------------------------------------------------
# The floor
# --------------------------------------------------------------------------------------------------


def floor(row: dict) -> dict:
    """FLOPs and bytes of one TiM4Rec training step at this setting, and the time each bounds.

    FLOPs: 2 per multiply-add of the forward pass, times 3 for forward plus backward (the backward
    of a product costs two products). Per token and layer, with D the width, E = expand * D, N the
    state, H heads, Q the chunk, K the conv width, L the length, up to the scan: x, B, C and dt's
    part of in_proj 2D(E+2N+H), conv 2K(E+2N), SSD 2Q(N+E) inside chunks plus 4NE for chunk
    states and their read-out, with time the time branch (two L x L products and the L -> 1 gate
    per head and sequence) 2H(2L+1); the position-wise rest, z's part of in_proj 2DE, out_proj
    2ED, FFN 16D^2, at every position but in the last layer, where only the scored position needs
    it (one per sequence); per sequence, the scores against every item 2D * n_items. Elementwise
    work is left out. Positions are the real ones (the training samples' mean length, times B),
    as nothing at a real position needs a padded one; the time branch runs over all L.

    Bytes: what a step cannot avoid moving in float32 (4 bytes): each layer's activations that the
    backward needs, written once and read once: the layer input [L D], in_proj's output (z [E] and
    the scan output [E] only where the rest is computed), the FFN hidden [4D] (likewise); the scores
    [n_items] per sequence, written, read and their gradient written; Adam's pass over parameters,
    gradients and two moments (7 reads and writes per parameter); the batch itself.
    """
    s = row["ssd"]
    B, L, D, n_items = row["batch"], row["length"], row["hidden"], row["n_items"]
    E, N, K, Q = s["expand"] * D, s["d_state"], s["d_conv"], s["chunk_size"]
    H = E // s["head_dim"]
    layers = s["num_layers"]
    real = B * L * row.get("real_fraction", 1.0)  # real positions per batch
    time_branch = B * L * 2 * H * (2 * L + 1) if s.get("is_time", True) else 0
    to_scan = (2 * D * (E + 2 * N + H) + 2 * K * (E + 2 * N) + 2 * Q * (N + E) + 4 * N * E)
    position_wise = 2 * D * E + 2 * E * D + 16 * D * D
    rest_positions = real * (layers - 1) + B  # where the position-wise rest is needed
    flops = 3 * (layers * (real * to_scan + time_branch) + rest_positions * position_wise
                 + B * 2 * D * n_items)
    activations = real * layers * (D + E + 2 * N + H) + rest_positions * (2 * E + 4 * D)
    params = n_items * D + layers * (D * (2 * E + 2 * N + H) + E * D + 8 * D * D
                                     + (2 * L * L if s.get("is_time", True) else 0))
    moved = 4 * (2 * activations + 3 * B * n_items + 7 * params) + 8 * B * (2 * L + 2)
    t_flops = flops / PEAK["fp32_flops"]
    t_bytes = moved / PEAK["bytes"]
    return {"gflop": flops / 1e9, "gb": moved / 1e9, "flops_ms": 1e3 * t_flops,
            "bytes_ms": 1e3 * t_bytes, "floor_ms": 1e3 * max(t_flops, t_bytes),
            "bound": "FLOPs" if t_flops > t_bytes else "bytes"}


# --------------------------------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------------------------------


def first_steps(setting: str, data_path: str, quick: bool) -> dict:
    """Cold and warm first steps, each in a fresh process, with throwaway cache folders; cold also
    with each kernel compiled at its first launch (no compiling ahead), the way it was before."""
    out = {}
    runs = [("cold", "warm", []), ("cold, one by one", None, ["--no-ahead"])]
    if not quick and setting == "a":
        runs += [("cold, no shipped choices", None, ["--no-shipped"])]
    for cold, warm, flags in runs:
        with tempfile.TemporaryDirectory() as tmp:
            caches = {"TRITON_CACHE_DIR": f"{tmp}/triton",
                      "TIM4REC_AUTOTUNE_CACHE": f"{tmp}/autotune.json"}
            args = ["--first-step", setting, f"--data_path={data_path}", *flags]
            out[cold] = run_json_child(__file__, args, caches)
            if warm:
                out[warm] = run_json_child(__file__, args, caches)
    firsts = {k: v["first_s"] for k, v in out.items()}
    # kernels, failed, dry_s, compile_s of the cold run (pipeline.precompile.compile_ahead)
    firsts["cold parts"] = {k: v for k, v in out["cold"].items() if k != "first_s"}
    return firsts


def markdown(results: list[dict]) -> str:
    lines = [("| setting | model | path | first step s | step ms | / SASRec (control) | / floor |"
              " peak GB | epoch s | 1.25 x batches x step + loading s | eval s |"), "|" + "---|" * 11]
    for r in results:
        control = r["rows"]["SASRec eager + anomaly"]["step_ms"]
        fl = r["floor"]["floor_ms"]
        for label, row in r["rows"].items():
            name, path = label.split(" ", 1)
            if "error" in row:
                error = row["error"].split(".")[0]  # e.g. "CUDA out of memory"
                lines.append(f"| {r['setting']} | {name} | {path} | {error} |" + " |" * 7)
                continue
            # the epoch's budget: its steps with a quarter more for the host, one pass of loading
            budget = 1.25 * r["batches"] * row["step_ms"] / 1e3 + r["loading_s"]
            epoch = f"{row['epoch_s']:.1f}" if "epoch_s" in row else "-"
            lines.append(
                f"| {r['setting']} | {name} | {path} | {row['first_s']:.1f} | "
                f"{row['step_ms']:.1f} | {row['step_ms'] / control:.2f} | "
                f"{row['step_ms'] / fl:.1f} | {row['peak_gb']:.2f} | {epoch} | {budget:.1f} | "
                f"{row.get('eval_s', float('nan')):.1f} |")
    ratios = []
    for r in results:
        for name in ("TiM4Rec", "SASRec"):
            plain, bf16 = (r["rows"].get(f"{name} {path}", {}) for path in ("graph", "graph, bf16"))
            if "step_ms" in plain and "step_ms" in bf16:
                ratios.append(f"({r['setting']}) {name} {bf16['step_ms'] / plain['step_ms']:.2f}")
    if ratios:
        lines += ["", "bf16 step / float32 step (graph rows, same call): " + ", ".join(ratios)]
    lines += ["", ("| setting | batch x L, D | items | batches | loading s | GFLOP | GB moved |"
                   " FLOPs ms | bytes ms | bound | TiM4Rec graph / floor | first step s (cold, warm"
                   "; cold one by one; no shipped choices) |"), "|" + "---|" * 12]
    for r in results:
        f, first = r["floor"], r.get("first_step", {})
        firsts = ", ".join(f"{first[k]:.1f}" for k in ("cold", "warm") if k in first)
        for key in ("cold, one by one", "cold, no shipped choices"):
            firsts += f"; {first[key]:.1f}" if key in first else "; -"
        graph = r["rows"].get("TiM4Rec graph", {})
        ratio = f"{graph['step_ms'] / f['floor_ms']:.1f}" if "step_ms" in graph else "-"
        lines.append(f"| {r['setting']} | {r['batch']} x {r['length']}, {r['hidden']}d | "
                     f"{r['n_items']:,} | {r['batches']} | {r['loading_s']:.1f} | "
                     f"{f['gflop']:.0f} | {f['gb']:.2f} | {f['flops_ms']:.2f} | "
                     f"{f['bytes_ms']:.2f} | {f['bound']} | "
                     f"{ratio} | {firsts} |")
    for label in ("TiM4Rec graph", "TiM4Rec graph, bf16"):
        profiled = [r for r in results if "kernel_ms" in r["rows"].get(label, {})]
        if profiled:
            lines += ["", f"{label} step, GPU ms per step by kind of kernel:"]
        for r in profiled:
            kinds = r["rows"][label]["kernel_ms"]
            lines.append(f"- ({r['setting']}) "
                         + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()))
            top = r["rows"][label].get("top_kernels_ms", {})
            lines.append("  longest kernels: " + "; ".join(f"{k} {v:.2f}" for k, v in top.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path")
    parser.add_argument("--settings", default="a,b,c")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="models to time; TiM4Rec and SASRec (the control) always")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", action="append", default=[], metavar="ROW",
                        help="leave out the rows labelled ROW, e.g. 'graph, chunk 64' (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="also break TiM4Rec's graph steps (float32, bf16) down by kind of "
                             "kernel (torch.profiler)")
    parser.add_argument("--phase", choices=("all", "steps", "first"), default="all",
                        help="steps: everything but the first steps; first: only those")
    parser.add_argument("--report", type=Path, nargs="+", default=None,
                        help="print the tables of these --json files (merged) and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--first-step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-shipped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-ahead", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)
    if not args.data_path:
        parser.error("--data_path is required")
    data_path = str(Path(args.data_path).resolve())
    settings = args.settings.split(",")
    if unknown := [s for s in settings if s not in SETTINGS]:
        parser.error(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    models = tuple(args.models.split(","))
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if not {"TiM4Rec", "SASRec"} <= set(models):
        parser.error("--models must include TiM4Rec and SASRec (the control)")

    env = gpu_environment("gpu_speed")
    if args.child or args.first_step:
        result = (child(args.child, data_path, args.quick, args.profile, models, args.skip)
                  if args.child else
                  first_step_child(args.first_step, data_path, shipped=not args.no_shipped,
                                   ahead=not args.no_ahead))
        args.child_out.write_text(json.dumps(result))
        return 0

    results = []
    for setting in settings:
        result = {"setting": setting}
        if args.phase in ("all", "steps"):
            result = run_json_child(__file__, ["--child", setting, f"--data_path={data_path}"]
                                + (["--quick"] if args.quick else []) + [f"--models={args.models}"]
                                + (["--profile"] if args.profile else [])
                                + [f"--skip={label}" for label in args.skip])
            result["floor"] = floor(result)
            result["upstream"] = UPSTREAM[setting]
        if args.phase in ("all", "first"):
            result["first_step"] = first_steps(setting, data_path, args.quick)
        results.append(result)
        # After every setting: a run cut short keeps what it measured.
        write_json(args.json, {"environment": env, "peak": PEAK, "results": results})
    print(json.dumps(env))
    if args.phase != "first":
        print(markdown(results))
    else:
        print(json.dumps({r["setting"]: r["first_step"] for r in results}))
    return 0


def report(paths: list[Path]) -> int:
    """The tables of one or more --json files; entries of one setting are merged."""
    merged: dict[str, dict] = {}
    for path in paths:
        for result in json.loads(path.read_text())["results"]:
            merged.setdefault(result["setting"], {}).update(result)
    print(markdown([merged[s] for s in sorted(merged) if "rows" in merged[s]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
