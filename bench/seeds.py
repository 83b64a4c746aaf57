"""Train several models over several seeds at once, a few runs per GPU, then print the report.

    python bench/seeds.py --models TiM4Rec SASRec --seeds 2020 2021 2022 [--gpus 0,1]
        [--per-gpu 6] [--logs DIR] -- --config=config/config4beauty_64d.yaml --dataset=amazon-sports

Everything after ``--`` goes to every ``run.py``. Jobs start in the order (model, seed) given, each
on the GPU with the fewest running jobs, at most ``--per-gpu`` at a time on one GPU; each job's
console output goes to ``DIR/<model>-<seed>.out``. Runs write their results as usual
(``log/<model>/<run>.json``), and ``report.py`` reads them at the end.

Small models leave most of a GPU idle, so several runs share one; their seconds per epoch then
measure a shared GPU and are not comparable with runs that had it alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--gpus", default="0", help="comma-separated GPU ids (default: 0)")
    parser.add_argument("--per-gpu", type=int, default=4, help="most concurrent runs on one GPU")
    parser.add_argument("--logs", type=Path, default=ROOT / "log" / "seeds",
                        help="folder for each job's console output")
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if a != "--"]
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    args.logs.mkdir(parents=True, exist_ok=True)

    queue = [(m, s) for m in args.models for s in args.seeds]
    running: dict[str, list] = {g: [] for g in gpus}
    failed = []
    start = time.time()
    while queue or any(running.values()):
        for gpu, jobs in running.items():
            for job in [j for j in jobs if j[0].poll() is not None]:
                jobs.remove(job)
                proc, name, began = job
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                failed += [name] if proc.returncode else []
                print(f"{time.time() - start:7.0f}s  {name} {status} in {time.time() - began:.0f}s",
                      flush=True)
        gpu = min(gpus, key=lambda g: len(running[g]))
        if queue and len(running[gpu]) < args.per_gpu:
            model, seed = queue.pop(0)
            name = f"{model}-{seed}"
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "OMP_NUM_THREADS": "2"}
            out = (args.logs / f"{name}.out").open("w")
            cmd = [sys.executable, str(ROOT / "run.py"), f"--model={model}", f"--seed={seed}",
                   "--show_progress=False", *extra]
            running[gpu].append((subprocess.Popen(cmd, env=env, stdout=out,
                                                  stderr=subprocess.STDOUT, cwd=ROOT),
                                 name, time.time()))
            print(f"{time.time() - start:7.0f}s  {name} started on GPU {gpu}", flush=True)
            continue
        time.sleep(2)
    log_dir = next((a.split("=", 1)[1] for a in extra if a.startswith("--log_dir=")), "log")
    subprocess.run([sys.executable, str(ROOT / "report.py"), "--runs", log_dir,
                    "--plots", str(args.logs / "plots")], cwd=ROOT, check=False)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
