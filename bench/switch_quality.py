"""What a switch does to the test metrics: the same training run with one setting at other values.

    python bench/switch_quality.py --switch enable_tf32 --runs False,False,True [--seeds 2020,2021]
        [--parallel] [--json OUT.json] -- \\
        --config=config/config4beauty_64d.yaml --dataset=amazon-sports --data_path=DIR

Everything after ``--`` goes to every ``run.py`` call. ``--runs`` lists the runs by the value each
gives the setting ``--switch``; ``--seeds``, if given, repeats that list for each seed. Runs with
the same value and seed show how far two runs land apart anyway (mamba-ssm's backward sums with
atomics, in no fixed order); runs with other seeds, how far the seed moves them: the yardsticks
for the difference the switch makes. ``--parallel`` starts every run at once (on one GPU that is
big enough for all). Prints a Markdown table of the test metrics; ``--json`` writes the runs'
results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import publish, run_results, start_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--switch", required=True, help="the setting to vary, e.g. enable_tf32")
    parser.add_argument("--runs", required=True,
                        help="the setting's value in each run, in order, e.g. False,False,True")
    parser.add_argument("--seeds", default=None, help="run the list once per seed, e.g. 2020,2021")
    parser.add_argument("--parallel", action="store_true", help="start every run at once")
    parser.add_argument("--json", type=Path, default=None, help="write the runs' results here")
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if a != "--"]
    seeds = args.seeds.split(",") if args.seeds else [None]
    plan = [(value, seed) for seed in seeds for value in args.runs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp) / f"run{i}" for i in range(len(plan))]
        calls = [[f"--{args.switch}={value}", *([f"--seed={seed}"] if seed else []), *extra]
                 for value, seed in plan]
        if args.parallel:
            processes = [start_run(call, d) for call, d in zip(calls, dirs)]
            codes = [p.wait() for p in processes]
        else:
            codes = [start_run(call, d).wait() for call, d in zip(calls, dirs)]
        if any(codes):
            print(f"switch_quality: a run failed (exit codes {codes})", file=sys.stderr)
            return 1
        out = [{args.switch: value, "seed_arg": seed, **run_results(d)}
               for (value, seed), d in zip(plan, dirs)]
    metrics = list(out[0]["test_result"])
    lines = [f"| run | {args.switch} | seed | best epoch | epochs | "
             + " | ".join(f"test {m}" for m in metrics) + " |",
             "|---|---|---|---|---|" + "---|" * len(metrics)]
    for i, run in enumerate(out):
        lines.append(f"| {i} | {run[args.switch]} | {run['seed_arg'] or '-'} | {run['best_epoch']} "
                     f"| {len(run['epochs'])} | "
                     + " | ".join(f"{run['test_result'][m]:.4f}" for m in metrics) + " |")
    publish(lines, out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
