#!/usr/bin/env python3
"""Benchmark dataset/prepare.py on a generated MovieLens-style ratings.dat of 1M rows.

Generates ``ratings.dat`` (``user::item::rating::timestamp``, the ML-1M layout and size: 6,040
users, 3,706 items, skewed activity and popularity, ties on the same second) in a temporary folder,
then converts it with ``prepare.py ml-1m`` in a child process, several times. For each run it
reports wall time, CPU time and the child's peak resident memory, taken from ``os.wait4`` (the
rusage of that child alone). A child that only imports numpy is measured the same way, so the
memory that the conversion itself needs can be told apart from the interpreter's.

The data is generated in a child process too: a forked child's peak RSS counts the pages it shared
with its parent before exec, so the measuring process itself stays small (it never imports numpy).

    python bench/prepare_1m.py                 # 1,000,000 rows, 3 runs
    python bench/prepare_1m.py --rows 200000 --runs 1 --zip
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PREPARE = REPO_ROOT / "dataset" / "prepare.py"
FIRST_STAMP = 956703932  # ML-1M's first rating, 2000-04-25


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    returncode: int
    output: str


def generate_ratings(path: Path, rows: int, users: int, items: int, seed: int) -> None:
    """Write a ratings.dat with ML-1M-like shape; deterministic for a seed."""
    import numpy as np  # only in the generating child: see the module docstring

    rng = np.random.default_rng(seed)
    user_weight = rng.pareto(1.5, users) + 1
    item_weight = 1.0 / np.arange(1, items + 1) ** 0.8
    user = rng.choice(np.arange(1, users + 1), size=rows, p=user_weight / user_weight.sum())
    item = rng.choice(rng.permutation(np.arange(1, items + 1)), size=rows,
                      p=item_weight / item_weight.sum())
    rating = rng.integers(1, 6, size=rows)
    # Coarse times (whole minutes) so that same-second ties are common, as in ML-1M.
    stamp = FIRST_STAMP + rng.integers(0, 3 * 365 * 24 * 60, size=rows) * 60
    with open(path, "w", encoding="ascii") as f:
        for start in range(0, rows, 100_000):
            block = zip(*(a[start:start + 100_000].tolist() for a in (user, item, rating, stamp)))
            f.write("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in block))


def measure(cmd: list[str]) -> Run:
    """Run cmd as a child; wall time, CPU time and peak RSS of that child only."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    return Run(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=usage.ru_maxrss / 1024,  # Linux reports kilobytes
        returncode=child.returncode,
        output=output,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="ratings to generate (default 1,000,000)")
    parser.add_argument("--users", type=int, default=6040)
    parser.add_argument("--items", type=int, default=3706)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3, help="conversions to time (default 3)")
    parser.add_argument("--zip", action="store_true",
                        help="convert a zip holding ml-1m/ratings.dat instead")
    parser.add_argument("--generate-only", type=Path, metavar="PATH", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.generate_only:
        generate_ratings(args.generate_only, args.rows, args.users, args.items, args.seed)
        return 0
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp_name:
        tmp = Path(tmp_name)
        raw = tmp / "ratings.dat"
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--generate-only", str(raw), "--rows", str(args.rows),
             "--users", str(args.users), "--items", str(args.items), "--seed", str(args.seed)],
            check=True,
        )
        print(f"generated {raw.name}: {args.rows:,} rows, {raw.stat().st_size / 2**20:.1f} MiB "
              f"in {time.perf_counter() - started:.1f} s")
        if args.zip:
            archive = tmp / "ml-1m.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
                z.write(raw, "ml-1m/ratings.dat")
            raw.unlink()
            raw = archive

        baseline = measure([sys.executable, "-c", "import numpy"])
        print(f"baseline (python + numpy import): peak RSS {baseline.peak_rss_mib:.1f} MiB")

        runs = []
        for n in range(args.runs):
            run = measure([sys.executable, str(PREPARE), "ml-1m", str(raw),
                           "--out", str(tmp / f"out{n}")])
            if run.returncode != 0:
                print(run.output, end="")
                print(f"prepare.py failed with status {run.returncode}", file=sys.stderr)
                return 1
            runs.append(run)
            print(f"run {n + 1}: wall {run.wall_s:.2f} s, cpu {run.cpu_s:.2f} s, "
                  f"peak RSS {run.peak_rss_mib:.1f} MiB")

        out = tmp / "out0" / "ml-1m" / "ml-1m.inter"
        with open(out, "rb") as f:
            lines = sum(1 for _ in f)
        if lines != args.rows + 1:
            print(f"expected {args.rows + 1:,} lines in {out.name}, found {lines:,}",
                  file=sys.stderr)
            return 1
        same = all((tmp / f"out{n}" / "ml-1m" / "ml-1m.inter").read_bytes() == out.read_bytes()
                   for n in range(1, len(runs)))
        wall = statistics.median(r.wall_s for r in runs)
        peak = max(r.peak_rss_mib for r in runs)
        print(
            f"\nprepare.py ml-1m on {args.rows:,} rows ({raw.name}): median wall {wall:.2f} s "
            f"({args.rows / wall / 1e6:.2f} M rows/s), peak RSS {peak:.1f} MiB "
            f"({peak - baseline.peak_rss_mib:.1f} MiB above the bare interpreter with numpy), "
            f"output {out.stat().st_size / 2**20:.1f} MiB, runs byte-identical: {same}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
