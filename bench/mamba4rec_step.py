"""Mamba4Rec's training step on each selective-scan backend: time, peak memory, and agreement.

    python bench/mamba4rec_step.py --data_path=DIR [--settings a,b] [--backends triton,torch]
        [--device cuda|cpu] [--steps 20] [--json OUT.json]

DIR holds amazon-sports/ and ml-1m-half/; the settings are bench/common.py's: (a) Amazon-Sports,
L 50, 64d, batch 2048; (b) ML-1M-half, L 200, 64d, batch 2048 (Mamba4Rec's baseline config: 2
layers, d_state 32). One real training batch per setting.

- On CUDA, per backend: the step (zero_grad, forward, backward, Adam) eager and as a CUDA graph,
  median over ``--steps`` after warm-up (``common.time_steps``: CUDA events), with
  its peak memory; TiM4Rec's graph step on the same batch beside it (its default settings); and
  each backend's loss, full-sort scores and gradients in float32 against the PyTorch scan in
  float64 (dropout off), as relative errors.
- On the CPU: the ``torch`` backend's step, median wall-clock over ``--steps`` (after one), and the
  process's peak resident memory (getrusage), dataset included.

Prints one JSON line per row; ``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from common import (errors_against_float64, seeded_model, setting_config, setting_data,
                    time_steps, write_json)


def setting_batch(setting: str, data_path: str, device: str):
    """``(config, model class, dataset, train_data, batch)`` of Mamba4Rec at ``setting``."""
    config, model_class = setting_config("Mamba4Rec", setting, data_path,
                                         use_gpu=device == "cuda")
    dataset, train_data, _, batch = setting_data(config)
    return config, model_class, dataset, train_data, batch.to(device)


def cuda_rows(setting, data_path, backends, steps) -> list[dict]:
    import torch

    config, model_class, dataset, train_data, batch = setting_batch(setting, data_path, "cuda")

    def build(backend):  # the same weights for every backend (seed 0)
        return seeded_model(model_class, config, dataset, seed=0, mamba_backend=backend)

    base = {"setting": setting, "batch": len(batch), "length": config["MAX_ITEM_LIST_LENGTH"],
            "device": torch.cuda.get_device_name()}
    rows = []
    for backend in backends:
        for graph in (False, True):
            row = time_steps(build(backend), batch, graph=graph, anomaly=False, steps=steps,
                             train_data=train_data)
            rows.append({**base, "model": f"Mamba4Rec {backend}", "graph": graph, **row})
            torch.cuda.empty_cache()
    tim_config, tim_class = setting_config(None, setting, data_path)
    tim = seeded_model(tim_class, tim_config, dataset, seed=0)
    rows.append({**base, "model": "TiM4Rec", "graph": True,
                 **time_steps(tim, batch, graph=True, anomaly=False, steps=steps,
                              train_data=train_data)})
    del tim
    torch.cuda.empty_cache()
    rows.append({**base, "errors_vs_float64": errors_against_float64(build, backends, "torch",
                                                                     batch)})
    return rows


def cpu_rows(setting, data_path, steps) -> list[dict]:
    import torch

    config, model_class, dataset, _, batch = setting_batch(setting, data_path, "cpu")
    model = seeded_model(model_class, config, dataset, "cpu", seed=0, mamba_backend="torch")
    model.train()
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
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
