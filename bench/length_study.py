"""Training step time and peak GPU memory against the sequence length L, at a fixed number of
positions per batch, for TiM4Rec and the baselines.

    python bench/length_study.py [--data_path DIR] [--lengths 50,100,200,400,800,1600]
        [--tokens 102400] [--models TiM4Rec,SASRec,SASRec-sdpa,Mamba4Rec,LRURec,SSD4Rec]
        [--fill full|real] [--paths eager,graph] [--steps 20] [--json OUT.json] [--png OUT.png]
        [--device cuda|cpu]

**Models**, each at the project's settings for it (64d, 2 layers): ``config/config4movie_64d.yaml``
(the ML-1M setting) with a baseline's ``baseline/<Name>/config.yaml`` over it, built through the
project's pipeline (``pipeline.settings.build_config``, ``pipeline.registry.find_model``) with
``MAX_ITEM_LIST_LENGTH`` = L and ``train_batch_size`` = tokens // L. ``SASRec-sdpa`` is RecBole's
SASRec at its settings with the attention through ``scaled_dot_product_attention`` and RecBole's
causal and padding mask (``bench/sasrec_sdpa.py``); ``SASRec-sdpa-causal`` (not in the default
list) the same with the causal mask alone, which gives the same scores for right-padded sequences.

**Batches**, from ``DIR/ml-1m-half``: its interactions as RecBole loads them for training (users
and items with at least 5 interactions, ids remapped, timestamps as RecBole's float32, each user's
history sorted by time), and RecBole's training samples at L (:func:`common.training_samples`),
padded with 0 on the right. ``--fill`` picks among the samples:

- ``full`` (the default): those with exactly L inputs, that is windows of L consecutive
  interactions of one user and the next one as target. Every position of a batch is real, so a
  step's cost is that of length L. The windows of one user overlap, and the longest lengths draw
  on the few users with that many interactions (the JSON says from how many users each L's
  batches come).
- ``real``: all of them: the lengths that training at L sees, ever more padding as L grows.

For each L the study draws 4 batches of tokens // L samples at random (seed 0; without
replacement within a batch, unless there are fewer samples than that) and writes them once to a
temporary folder, with the loaded dataset, for the children; a child's steps cycle through them.

**Each (model, L) runs in its own process**, ``bench/length_step.py`` (its docstring says what it
times: ``eager``, and ``graph`` on a GPU, the step as the project's trainer takes it, its kernels
compiled ahead, the first step apart, then the median of ``--steps``), so that one running out of
memory ends only its own cell. The next child imports and loads during the current one's first
step (not during the steps it times), and touches the GPU only in its turn. ``--device cpu``
times the eager step with the host's clock and no memory: a smoke test.

**Outputs**: a Markdown table of every path; each model's step time over TiM4Rec's at each L; the
log-log slope of each model's step time against L, least squares over L >= 200 (at a fixed number
of positions, 0 is a cost per position that does not grow with L, 1 one that grows as L); and,
printed last, the main table: each model's default step on one GPU (``cuda_graph: auto``: the graph
for TiM4Rec, SASRec, its variants and Mamba4Rec; eager for LRURec and SSD4Rec), a cell per L, step
ms / peak GB, or what stopped it ("out of memory"). ``--json`` writes every number (after every
child, so a study cut short keeps what it measured); ``--png`` draws step time and peak memory
against L, log-log, one line per model.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_PATH, OUT_OF_MEMORY, SDPA_MODELS, draw_batches, load_interactions

DATASET = "ml-1m-half"
CONFIG_FILE = "config4movie_64d.yaml"  # the 64d, 2-layer setting; baselines' files go over it
LENGTHS = (50, 100, 200, 400, 800, 1600)
TOKENS = 102_400  # batch 2048 at L 50, the paper's batch, down to 64 at L 1600
MODELS = ("TiM4Rec", "SASRec", "SASRec-sdpa", "Mamba4Rec", "LRURec", "SSD4Rec")
PATHS = ("eager", "graph")
BATCHES = 4  # distinct batches per L, cycled through
WARMUP = 3  # steps after the first, before timing (a graph needs its own warm-up and capture too)
SLOPE_FROM = 200  # the slope is fitted over L >= this
BELOW_FROM = 400  # TiM4Rec's step against the SASRecs' over L >= this
CHILD_TIMEOUT_S = 300


# --------------------------------------------------------------------------------------------------
# Batches (the parent)
# --------------------------------------------------------------------------------------------------


def prepare(data_path: str, lengths, tokens: int, fill: str, work: Path) -> dict:
    """Write the dataset and each L's batches under ``work``; what each L's batches are."""
    import torch

    dataset, arrays = load_interactions(CONFIG_FILE, data_path, DATASET)
    with open(work / "dataset.pkl", "wb") as handle:
        pickle.dump(dataset, handle)
    info = {}
    for length in lengths:
        batch = max(1, tokens // length)
        data = draw_batches(arrays, length, batch, fill, BATCHES)
        torch.save(data, work / f"batches-{length}.pt")
        pool = data["pool_lengths"]
        info[length] = {"batch": batch, "samples": len(pool)}
        if "items" in data:
            info[length].update({
                "real_fraction": float(data["lengths"].double().mean()) / length,
                "samples_real_fraction": float(pool.double().mean()) / length,
                "users": data["users"]})
    return info


# --------------------------------------------------------------------------------------------------
# The parent: children in turn, and the report
# --------------------------------------------------------------------------------------------------


class Child:
    """The process of one (model, L). It loads (imports, config, batches), says so on its stdout
    and waits for ``go``; then it builds and times its model, and waits once more, for ``quiet``,
    between its first step and the steps it times. :func:`study` starts the next child when it
    sends ``go`` to this one, and sends ``quiet`` once that one has loaded: loading overlaps
    this child's first step, not the steps it times."""

    def __init__(self, model: str, length: int, work: Path, args):
        self.model, self.length = model, length
        self.out = work / f"result-{model}-{length}.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().with_name("length_step.py")),
             f"--child={model}", f"--length={length}", f"--work={work}",
             f"--child-out={self.out}", "--wait", f"--data_path={args.data_path}",
             f"--dataset={DATASET}", f"--config_file={CONFIG_FILE}", f"--device={args.device}",
             f"--steps={args.steps}", f"--warmup={WARMUP}", f"--paths={args.paths}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.loaded = False

    def wait_loaded(self) -> None:
        if not self.loaded:
            self.proc.stdout.readline()  # "ready", or nothing where it failed while loading
            self.loaded = True

    def send(self, word: str) -> None:
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it has ended: its exit code says how

    def result(self) -> dict:
        try:
            code = self.proc.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
        finally:
            self.close()
        if self.out.is_file():
            return json.loads(self.out.read_text())
        return {"error": f"its process failed (exit code {code})"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # a write still buffered for a child that has gone


def study(args, work: Path, models, lengths, info: dict, on_result) -> list[dict]:
    """Every (model, L), one after another (see :class:`Child`); ``on_result(results)`` after
    each. An L without samples (``info``) gets that as its cells' entry."""
    results = [{"model": model, "length": length, "error": "no sample of that length"}
               for length in lengths if "real_fraction" not in info[length] for model in models]
    jobs = [(model, length) for length in lengths if "real_fraction" in info[length]
            for model in models]
    current, pending = None, Child(*jobs[0], work, args) if jobs else None
    try:
        for index in range(len(jobs)):
            current = pending
            current.wait_loaded()
            current.send("go")
            pending = Child(*jobs[index + 1], work, args) if index + 1 < len(jobs) else None
            if pending is not None:
                pending.wait_loaded()
            current.send("quiet")
            result = current.result()
            result.setdefault("model", current.model)
            result.setdefault("length", current.length)
            results.append(result)
            on_result(results)
    finally:
        for child_ in (current, pending):
            if child_ is not None:
                child_.stop()
    return results


def chosen_row(result: dict) -> tuple[str | None, dict]:
    """The path shown for a result, and its row: the model's default step where it was timed."""
    rows = result.get("rows", {})
    if "error" in result:
        return None, {"error": result["error"]}
    path = result.get("default")
    if path not in rows:
        path = next(iter(rows), None)
    return path, rows.get(path, {"error": "not timed"})


def loglog_slope(points: dict[int, float], from_length: int = SLOPE_FROM) -> float | None:
    """Least-squares slope of log(value) against log(L) over L >= ``from_length``."""
    pairs = [(math.log(L), math.log(v)) for L, v in points.items() if L >= from_length and v > 0]
    if len(pairs) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in pairs)
    mean_y = statistics.fmean(y for _, y in pairs)
    sxx = sum((x - mean_x) ** 2 for x, _ in pairs)
    return sum((x - mean_x) * (y - mean_y) for x, y in pairs) / sxx if sxx else None


def _cell(row: dict) -> str:
    if "error" in row:
        error = row["error"].removeprefix("RuntimeError: ").replace("|", "/")
        return error if len(error) <= 60 else error[:57] + "..."
    peak = row.get("peak_gb")
    return f"{row['step_ms']:.1f} ms" + (f" / {peak:.2f} GB" if peak is not None else "")


def _ran_out(result: dict | None) -> bool:
    return result is not None and chosen_row(result)[1].get("error") == OUT_OF_MEMORY


def summarize(results: list[dict], models, lengths) -> dict:
    """Per model: the shown path, the step ms of each L where it ran, and the slope."""
    summary = {}
    for model in models:
        paths, steps = set(), {}
        for r in results:
            if r["model"] == model:
                path, row = chosen_row(r)
                paths.add(path)
                if "step_ms" in row:
                    steps[r["length"]] = row["step_ms"]
        summary[model] = {"path": "/".join(sorted(p for p in paths if p)) or "-",
                          "step_ms": steps, "slope": loglog_slope(steps)}
    return summary


def markdown(results: list[dict], models, lengths, info: dict, summary: dict) -> str:
    by_key = {(r["model"], r["length"]): r for r in results}
    head = "| {} | " + " | ".join(f"L {L} (batch {info[L]['batch']})" for L in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    lines = ["Every path (step ms / peak GB):", "", head.format("model, path"), rule]
    for model in models:
        for path in PATHS:
            cells = [by_key.get((model, L), {}).get("rows", {}).get(path) for L in lengths]
            if any(cells):
                lines.append(f"| {model}, {path} | "
                             + " | ".join(_cell(c) if c else "-" for c in cells) + " |")
    base = summary.get("TiM4Rec", {}).get("step_ms", {})
    if base:
        lines += ["", "Step time over TiM4Rec's (each model's default step):", "",
                  head.format("model"), rule]
        for model in models:
            ms = summary[model]["step_ms"]
            lines.append(f"| {model} | " + " | ".join(
                f"{ms[L] / base[L]:.2f}" if L in ms and L in base else "-" for L in lengths) + " |")
    lines += ["", f"Log-log slope of step time against L (least squares over L >= {SLOPE_FROM}):"]
    for model in models:
        slope = summary[model]["slope"]
        lines.append(f"- {model} ({summary[model]['path']}): "
                     + (f"{slope:.2f}" if slope is not None else "-"))
    tim4rec = summary.get("TiM4Rec", {})
    controls = [m for m in models if m.startswith("SASRec") and summary[m]["step_ms"]]
    if tim4rec.get("slope") is not None and controls:
        over = [L for L in lengths if L >= BELOW_FROM and L in tim4rec["step_ms"]]
        below = over and all(L in summary[m]["step_ms"] or _ran_out(by_key.get((m, L)))
                             for m in controls for L in over) and all(
            tim4rec["step_ms"][L] < summary[m]["step_ms"][L]
            for m in controls for L in over if L in summary[m]["step_ms"])
        lines.append(f"- TiM4Rec: slope {tim4rec['slope']:.2f}; its step shorter than "
                     f"{' and '.join(controls)}'s at every L >= {BELOW_FROM} (out of memory "
                     f"counts as longer): {'yes' if below else 'no'}")
    lines += ["", "Main table: each model's default step, step ms / peak GB (the batch at each L "
              "in its column's head):", "", head.format("model (step)"), rule]
    for model in models:
        cells = []
        for L in lengths:
            r = by_key.get((model, L))
            cells.append(_cell(chosen_row(r)[1]) if r else "-")
        lines.append(f"| {model} ({summary[model]['path']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], models, path: Path) -> None:
    """Step time and peak memory against L, log-log, one line per model (its default step)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in models:
        points = sorted((r["length"], chosen_row(r)[1]) for r in results if r["model"] == model)
        for ax, key in ((left, "step_ms"), (right, "peak_gb")):
            xy = [(L, row[key]) for L, row in points if row.get(key) is not None]
            if xy:
                shown = "/".join(sorted({chosen_row(r)[0] or "-" for r in results
                                         if r["model"] == model}))
                ax.plot(*zip(*xy), marker="o", label=f"{model} ({shown})")
    left.set(xlabel="sequence length L", ylabel="training step (ms)", xscale="log", yscale="log")
    right.set(xlabel="sequence length L", ylabel="peak GPU memory (GB)", xscale="log",
              yscale="log")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="small")
    fig.suptitle("fixed positions per batch (batch x L)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default=str(DATA_PATH),
                        help=f"folder holding {DATASET}/ (default: ../shared/datasets)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--tokens", type=int, default=TOKENS,
                        help="positions per batch: batch = tokens // L")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"any of {', '.join(MODELS + SDPA_MODELS[1:])}, or another model")
    parser.add_argument("--fill", choices=("full", "real"), default="full",
                        help="full: every input exactly L long; real: training's lengths at L")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="eager, graph or both; graph on a GPU only")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    args.data_path = str(Path(args.data_path).resolve())

    lengths, models = _int_list(args.lengths), [m for m in args.models.split(",") if m]
    if not lengths or min(lengths) < 1 or args.tokens < 1 or args.steps < 1:
        parser.error("--lengths, --tokens and --steps must be positive")
    if unknown := [p for p in args.paths.split(",") if p not in PATHS]:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    if not (Path(args.data_path) / DATASET / f"{DATASET}.inter").is_file():
        parser.error(f"no {DATASET}/{DATASET}.inter under {args.data_path}")
    from pipeline.errors import UserError
    from pipeline.registry import find_model

    for model in models:
        if model not in SDPA_MODELS:
            try:
                find_model(model)
            except UserError as error:
                parser.error(str(error))

    with tempfile.TemporaryDirectory(prefix="length-study-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        info = prepare(args.data_path, lengths, args.tokens, args.fill, work)
        print(f"length_study: batches ready in {time.perf_counter() - start:.1f} s: "
              f"{json.dumps(info)}", file=sys.stderr, flush=True)
        settings = {"dataset": DATASET, "config": CONFIG_FILE, "tokens": args.tokens,
                    "fill": args.fill, "lengths": lengths, "models": models, "paths": args.paths,
                    "steps": args.steps, "warmup": WARMUP, "batches_per_length": BATCHES,
                    "device": args.device}

        def write(results):
            if args.json:
                envs = [r["environment"] for r in results if "environment" in r]
                args.json.write_text(json.dumps({
                    "environment": envs[0] if envs else None, "settings": settings,
                    "batches": info, "results": results,
                    "summary": summarize(results, models, lengths)}, indent=1))

        results = study(args, work, models, lengths, info, write)
    summary = summarize(results, models, lengths)
    if args.png:
        plot(results, models, args.png)
    envs = [r["environment"] for r in results if "environment" in r]
    if envs:
        print(json.dumps(envs[0]))
    print(f"length_study: {time.perf_counter() - start:.0f} s in all", file=sys.stderr)
    print(markdown(results, models, lengths, info, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
