"""What TF32 does to the test metrics: the same training run with ``enable_tf32`` off and on.

    python bench/tf32_quality.py [--runs off,off,on] [--parallel] -- \\
        --config=config/config4beauty_64d.yaml --dataset=amazon-sports --data_path=DIR

Everything after ``--`` goes to every ``run.py`` call (same settings and seed). ``--runs`` lists the
runs by their TF32 setting: two runs with it off show how far two runs of the same settings land
apart anyway (mamba-ssm's backward sums with atomics, in no fixed order), which is the yardstick for
the difference TF32 makes. ``--parallel`` starts every run at once (on one GPU that is big enough
for all). Prints a Markdown table of the test metrics; ``--json`` writes the runs' results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import runs  # the script beside this one

SETTINGS = {"off": "False", "on": "True"}


def start(tf32: str, extra: list[str], log_dir: Path):
    return runs.start([f"--enable_tf32={SETTINGS[tf32]}", *extra], log_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="off,off,on",
                        help="TF32 setting of each run, in order: off or on (default off,off,on)")
    parser.add_argument("--parallel", action="store_true", help="start every run at once")
    parser.add_argument("--json", type=Path, default=None, help="write the runs' results here")
    args, rest = parser.parse_known_args(argv)
    settings = args.runs.split(",")
    if unknown := [r for r in settings if r not in SETTINGS]:
        parser.error(f"--runs takes off and on, got {unknown}")
    extra = [a for a in rest if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp) / f"run{i}_tf32_{tf32}" for i, tf32 in enumerate(settings)]
        if args.parallel:
            processes = [start(tf32, extra, d) for tf32, d in zip(settings, dirs)]
            codes = [p.wait() for p in processes]
        else:
            codes = [start(tf32, extra, d).wait() for tf32, d in zip(settings, dirs)]
        if any(codes):
            print(f"tf32_quality: a run failed (exit codes {codes})", file=sys.stderr)
            return 1
        out = [{"tf32": tf32, **runs.results(d)} for tf32, d in zip(settings, dirs)]
    metrics = list(out[0]["test_result"])
    lines = ["| run | TF32 | best epoch | epochs | " + " | ".join(f"test {m}" for m in metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for i, run in enumerate(out):
        lines.append(f"| {i} | {run['tf32']} | {run['best_epoch']} | {len(run['epochs'])} | "
                     + " | ".join(f"{run['test_result'][m]:.4f}" for m in metrics) + " |")
    runs.publish(lines, out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
