"""Mamba4Rec's training step on each selective-scan backend: time, peak memory, and agreement.

    python bench/mamba4rec_step.py --data_path=DIR [--settings a,b] [--backends triton,torch]
        [--device cuda|cpu] [--steps 20] [--json OUT.json]

DIR holds amazon-sports/ and ml-1m-half/; the settings are bench/gpu_check.py's: (a) Amazon-Sports,
L 50, 64d, batch 2048; (b) ML-1M-half, L 200, 64d, batch 2048 (Mamba4Rec's baseline config: 2
layers, d_state 32). One real training batch per setting.

- On CUDA, per backend: the step (zero_grad, forward, backward, Adam) eager and as a CUDA graph,
  median over ``--steps`` after warm-up (bench/gpu_speed.py's ``time_steps``: CUDA events), with
  its peak memory; TiM4Rec's graph step on the same batch beside it (its default settings); and
  each backend's loss, full-sort scores and gradients in float32 against the PyTorch scan in
  float64 (dropout off), as relative errors.
- On the CPU: the ``torch`` backend's step, median wall-clock over ``--steps`` (after one), and the
  process's peak resident memory (getrusage), dataset included.

Prints one JSON line per row; ``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def setting_data(setting: str, data_path: str, device: str):
    """``(config, dataset, train_data, batch)`` of Mamba4Rec at ``setting``."""
    from gpu_check import SETTINGS
    from recbole.data import create_dataset, data_preparation

    from pipeline.settings import CONFIG_DIR, build_config

    config_file, dataset_name = SETTINGS[setting]
    config, _ = build_config("Mamba4Rec", [CONFIG_DIR / config_file],
                             {"dataset": dataset_name, "data_path": data_path,
                              "show_progress": False, "use_gpu": device == "cuda"})
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    return config, dataset, train_data, next(iter(train_data)).to(device)


def make(config, dataset, device: str, **changes):
    """Mamba4Rec with ``changes`` to its config, the same weights for every change (seed 0)."""
    import torch

    from pipeline.registry import find_model

    config = copy.deepcopy(config)
    for key, value in changes.items():
        config[key] = value
    torch.manual_seed(0)
    return find_model("Mamba4Rec").model_class(config, dataset).to(device)


def errors_against_float64(config, dataset, batch, backends, device="cuda") -> dict:
    """Relative errors of each backend (float32) against the PyTorch scan in float64."""
    import torch

    def run(model):
        model.eval()  # no dropout
        model.zero_grad(set_to_none=True)
        loss = model.calculate_loss(batch)
        loss.backward()
        with torch.no_grad():
            scores = model.full_sort_predict(batch)
        return loss.detach(), scores, {n: p.grad for n, p in model.named_parameters()
                                       if p.grad is not None}

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    ref_loss, ref_scores, ref_grads = run(make(config, dataset, device,
                                               mamba_backend="torch").double())
    out = {}
    for backend in backends:
        loss, scores, grads = run(make(config, dataset, device, mamba_backend=backend))
        grad_errors = {n: rel(g, ref_grads[n]) for n, g in grads.items()}
        worst = max(grad_errors, key=grad_errors.get)
        out[backend] = {"loss": rel(loss, ref_loss), "scores": rel(scores, ref_scores),
                        "grads_max": grad_errors[worst], "grads_max_param": worst}
    return out


def cuda_rows(setting, data_path, backends, steps) -> list[dict]:
    import torch
    from gpu_check import SETTINGS
    from gpu_speed import time_steps

    from pipeline.settings import CONFIG_DIR, build_config

    config, dataset, train_data, batch = setting_data(setting, data_path, "cuda")
    base = {"setting": setting, "batch": len(batch), "length": config["MAX_ITEM_LIST_LENGTH"],
            "device": torch.cuda.get_device_name()}
    rows = []
    for backend in backends:
        for graph in (False, True):
            model = make(config, dataset, "cuda", mamba_backend=backend)
            row = time_steps(model, batch, graph=graph, anomaly=False, steps=steps,
                             train_data=train_data)
            rows.append({**base, "model": f"Mamba4Rec {backend}", "graph": graph, **row})
            del model
            torch.cuda.empty_cache()
    tim_config, spec = build_config(None, [CONFIG_DIR / SETTINGS[setting][0]],
                                    {"dataset": SETTINGS[setting][1], "data_path": data_path,
                                     "show_progress": False})
    torch.manual_seed(0)
    tim = spec.model_class(tim_config, dataset).cuda()
    rows.append({**base, "model": "TiM4Rec", "graph": True,
                 **time_steps(tim, batch, graph=True, anomaly=False, steps=steps,
                              train_data=train_data)})
    del tim
    torch.cuda.empty_cache()
    rows.append({**base, "errors_vs_float64": errors_against_float64(config, dataset, batch,
                                                                     backends)})
    return rows


def cpu_rows(setting, data_path, steps) -> list[dict]:
    import torch

    config, dataset, _, batch = setting_data(setting, data_path, "cpu")
    model = make(config, dataset, "cpu", mamba_backend="torch").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.calculate_loss(batch).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return [{"setting": setting, "batch": len(batch), "length": config["MAX_ITEM_LIST_LENGTH"],
             "model": "Mamba4Rec torch", "device": "cpu", "threads": torch.get_num_threads(),
             "step_s": statistics.median(times[1:]), "first_s": times[0],
             "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--settings", default="a,b")
    parser.add_argument("--backends", default="triton,torch")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for setting in args.settings.split(","):
        new = (cuda_rows(setting, args.data_path, args.backends.split(","), args.steps)
               if args.device == "cuda" else cpu_rows(setting, args.data_path, args.steps))
        for row in new:
            print(json.dumps(row), flush=True)
        rows += new
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
