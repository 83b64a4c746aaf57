"""Training throughput with N processes against one, and the test metrics of both runs.

    python bench/ddp_throughput.py [--nproc 2] -- --config=config/config4movie_64d.yaml \\
        --dataset=ml-1m-half --epochs=5

Everything after ``--`` goes to both ``run.py`` calls (the same settings, seed and global batch);
the first uses one process, the second ``--nproc``. Throughput is training samples per second over
the median epoch after the first (which pays for compilation and warm-up). Prints a Markdown table
and writes both runs' results beside it (``--json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import publish, run_results, start_run


def train(nproc: int, extra: list[str], log_dir: Path) -> dict:
    if code := start_run([f"--nproc={nproc}", *extra], log_dir).wait():
        raise SystemExit(f"ddp_throughput: the run with {nproc} process(es) failed (exit {code})")
    return run_results(log_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write both runs' results here")
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        done = [train(n, extra, Path(tmp) / f"nproc{n}") for n in (1, args.nproc)]
    metric = done[0]["valid_metric"].lower()
    header = ("| processes | samples / epoch | epoch s (median after the first) | samples / s | "
              f"/ 1 process | best epoch | test {metric} |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    base = None
    for run in done:
        seconds = statistics.median(e["train_s"] for e in run["epochs"][1:] or run["epochs"])
        rate = run["train_samples"] / seconds
        base = base or rate
        rows.append(f"| {run['processes']} | {run['train_samples']:,} | {seconds:.2f} | "
                    f"{rate:,.0f} | {rate / base:.2f} | {run['best_epoch']} | "
                    f"{run['test_result'][metric]:.4f} |")
    publish(rows, done, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
