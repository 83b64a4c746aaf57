"""Compare finished runs: a Markdown table of test metrics per dataset and model, and PNG plots.

    python report.py [--runs log/] [--plots log/report/] [--dataset NAME] [--model NAME ...]

Every training run writes its results beside its log (``log/<model>/<run>.json``). This reads them
all and groups like with like: runs of one model on one dataset whose settings differ only in the
seed (and in where and how they ran: paths, GPU, progress bars) form a group, shown as mean ±
standard deviation over its seeds (a single run without ±). Groups of one model that differ in some
setting get a row each, with the settings that tell them apart; resumed runs are never grouped with
runs trained from scratch, and are marked. It prints one table per dataset (test Hit/NDCG/MRR at
each cut-off, best epoch, training seconds per epoch, parameters), and draws per dataset the
validation metric of every run by epoch and the training time per epoch of every model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from pipeline import ROOT
from pipeline.errors import UserError
from pipeline.settings import PLACE_KEYS


def load_runs(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and {"run", "model", "dataset", "test_result"} <= data.keys():
            runs.append(data)
    return runs


# Runs differing only in these are one group: where and how they ran (PLACE_KEYS), the seed, and
# two settings that change no computed number (compiling before the first step; the batch size of
# the full-sort evaluation).
NOT_SETTINGS = PLACE_KEYS | {"seed", "compile_ahead", "eval_batch_size"}


def settings_of(run: dict) -> dict | None:
    """The run's settings that decide its results, or None for results written before runs
    recorded their settings."""
    if "config" not in run:
        return None
    return {k: v for k, v in run["config"].items() if k not in NOT_SETTINGS}


def group_key(run: dict) -> tuple:
    settings = settings_of(run)
    frozen = None if settings is None else json.dumps(settings, sort_keys=True, default=str)
    return run["model"], bool(run.get("resumed_from")), frozen


def differences(groups: list[list[dict]]) -> list[str]:
    """A label per group of one model: the settings whose values differ between the groups."""
    settings = [settings_of(g[0]) for g in groups]
    known = [s for s in settings if s is not None]
    keys = sorted({k for s in known for k in s if len({json.dumps(x.get(k), default=str)
                                                        for x in known}) > 1})
    labels = []
    for group, these in zip(groups, settings):
        if these is None:
            label = "settings not recorded"
        else:
            label = ", ".join(f"{k}={these.get(k)}" for k in keys)
        if group[0].get("resumed_from"):
            label = ", ".join(filter(None, ["resumed", label]))
        labels.append(label)
    return labels


def mean_std(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def seconds_per_epoch(run: dict) -> float | None:
    times = [e["train_s"] for e in run.get("epochs", [])]
    return statistics.median(times) if times else None


def tables(runs: list[dict]) -> str:
    """One Markdown table per dataset, one row per group of like runs (see the module docstring),
    columns in the runs' metric order."""
    by_dataset = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_dataset[run["dataset"]][group_key(run)].append(run)
    out = []
    for dataset, groups in sorted(by_dataset.items()):
        metrics = list(next(iter(groups.values()))[0]["test_result"])
        out += [f"### {dataset}", "",
                "| model | settings | seeds | " + " | ".join(metrics)
                + " | best epoch | s / epoch | parameters |",
                "|" + "---|" * (len(metrics) + 6)]
        by_model = defaultdict(list)
        for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] or "")):
            by_model[key[0]].append(groups[key])
        for model, model_groups in sorted(by_model.items()):
            for group, label in zip(model_groups, differences(model_groups)):
                out.append(_row(model, label, group, metrics))
        out.append("")
    return "\n".join(out)


def _row(model: str, label: str, group: list[dict], metrics: list[str]) -> str:
    group = sorted(group, key=lambda r: (str(r["seed"]), r["run"]))
    cells = [mean_std([r["test_result"][m] for r in group]) for m in metrics]
    epochs = [r["best_epoch"] for r in group if r.get("best_epoch") is not None]
    times = [t for t in map(seconds_per_epoch, group) if t is not None]
    return (f"| {model} | {label or '-'} | {', '.join(str(r['seed']) for r in group)} | "
            + " | ".join(cells)
            + f" | {mean_std(epochs, 1) if epochs else '-'}"
            + f" | {mean_std(times, 2) if times else '-'}"
            + f" | {group[0].get('parameters', '-'):,} |")


def plot(runs: list[dict], folder: Path) -> list[Path]:
    """Per dataset: validation metric by epoch (a line per run),
    training time per epoch (a bar per model)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in sorted({r["dataset"] for r in runs}):
        group = [r for r in runs if r["dataset"] == dataset]
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in group:
            points = [(e["epoch"], e["valid_score"]) for e in run.get("epochs", [])
                      if "valid_score" in e]
            if points:
                ax.plot(*zip(*points), label=f"{run['model']} (seed {run['seed']})")
        ax.set(xlabel="epoch", ylabel=f"validation {group[0].get('valid_metric', 'score')}",
               title=dataset)
        ax.legend(fontsize="small")
        written.append(folder / f"{dataset}-validation.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

        per_model = defaultdict(list)
        for run in group:
            if seconds_per_epoch(run) is not None:
                per_model[run["model"]].append(seconds_per_epoch(run))
        fig, ax = plt.subplots(figsize=(7, 4))
        names = sorted(per_model)
        ax.bar(names, [statistics.mean(per_model[n]) for n in names])
        ax.set(ylabel="training seconds per epoch (median over epochs)", title=dataset)
        written.append(folder / f"{dataset}-epoch-time.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "log",
                        help="folder searched for results")
    parser.add_argument("--plots", type=Path, default=ROOT / "log" / "report", help="where PNGs go")
    parser.add_argument("--dataset", default=None, help="only this dataset")
    parser.add_argument("--model", action="append", default=None, help="only these models")
    args = parser.parse_args(argv)
    try:
        runs = [r for r in load_runs(args.runs)
                if (args.dataset is None or r["dataset"] == args.dataset)
                and (args.model is None or r["model"] in args.model)]
        if not runs:
            raise UserError(f"no finished runs (results *.json) under {args.runs}")
        print(tables(runs))
        for path in plot(runs, args.plots):
            print(f"plot: {path}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
