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
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(nproc: int, extra: list[str], log_dir: Path) -> dict:
    subprocess.run([sys.executable, str(ROOT / "run.py"), f"--nproc={nproc}",
                    f"--log_dir={log_dir}", "--show_progress=False", *extra], cwd=ROOT, check=True)
    (path,) = log_dir.rglob("*.json")
    return json.loads(path.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write both runs' results here")
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if a != "--"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.nproc):
            runs.append(train(n, extra, Path(tmp) / f"nproc{n}"))
    metric = runs[0]["valid_metric"].lower()
    header = ("| processes | samples / epoch | epoch s (median after the first) | samples / s | "
              f"/ 1 process | best epoch | test {metric} |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    base = None
    for run in runs:
        seconds = statistics.median(e["train_s"] for e in run["epochs"][1:] or run["epochs"])
        rate = run["train_samples"] / seconds
        base = base or rate
        rows.append(f"| {run['processes']} | {run['train_samples']:,} | {seconds:.2f} | {rate:,.0f} | "
                    f"{rate / base:.2f} | {run['best_epoch']} | {run['test_result'][metric]:.4f} |")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
