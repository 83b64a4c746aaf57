"""One training epoch of TiM4Rec and of RecBole's SASRec on the CPU, same data, batch and length.

    python bench/cpu_epoch.py [--config=config/config4ml100k_64d.yaml] [--key=value ...]

Both models train through this project's pipeline (config, data, trainer), so the only difference
is the model: TiM4Rec with its default config, SASRec with baseline/SASRec/config.yaml. One epoch
is timed after two warm-up steps; data loading is timed on its own. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import common  # noqa: F401  (the project on the import path)


def epoch_seconds(model_name, config_files, overrides):
    import torch

    from pipeline.runlog import RunLog, new_run
    from pipeline.settings import build_config
    from pipeline.trainer import ProjectTrainer
    from pipeline.workflow import build_model, load_data, seed_and_precision

    config, spec = build_config(model_name, config_files,
                                {**overrides, "use_gpu": False, "show_progress": False})
    log = RunLog("ERROR", quiet=True)
    try:
        seed_and_precision(config)
        start = time.perf_counter()
        _, train_data, _, _, _ = load_data(config)
        load_s = time.perf_counter() - start
        model = build_model(spec, config, train_data.dataset)
        run = new_run(spec.name, config["dataset"], "/tmp/cpu_epoch/saved", "/tmp/cpu_epoch/log",
                      "/tmp/cpu_epoch/tb")
        trainer = ProjectTrainer(config, model, run)
        for batch, _ in zip(train_data, range(2)):  # warm-up: allocator, thread pool, first calls
            trainer.optimizer.zero_grad()
            model.calculate_loss(batch).backward()
            trainer.optimizer.step()
        start = time.perf_counter()
        trainer._train_epoch(train_data, 0)
        epoch_s = time.perf_counter() - start
        return {"model": spec.name, "batches": len(train_data), "batch": config["train_batch_size"],
                "length": config["MAX_ITEM_LIST_LENGTH"], "epoch_s": epoch_s, "load_s": load_s,
                "threads": torch.get_num_threads()}
    finally:
        log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], type=Path)
    parser.add_argument("--order", nargs=2, default=["SASRec", "TiM4Rec"],
                        help="which model is timed first (default: SASRec TiM4Rec)")
    args, rest = parser.parse_known_args()
    overrides = dict(arg[2:].split("=", 1) for arg in rest)
    import torch

    rows = [epoch_seconds(name, args.config, overrides) for name in args.order]
    rows.sort(key=lambda r: r["model"] != "SASRec")  # the baseline row first
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{rows[0]['threads']} threads")
    print("| model | batches x (batch, L) | epoch s | / SASRec | data loading s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batches']} x ({r['batch']}, {r['length']}) | "
              f"{r['epoch_s']:.1f} | {r['epoch_s'] / rows[0]['epoch_s']:.2f} | "
              f"{r['load_s']:.1f} |")


if __name__ == "__main__":
    main()
