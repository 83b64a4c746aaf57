"""Top-10 for every user of a dataset, from a checkpoint: end to end, and the scoring alone.

    python bench/recommend_speed.py [--checkpoint PATH] [--data_path DIR] [--dataset amazon-sports]
        [--device cpu|cuda] [--repeats 3] [--json OUT.json]

Without ``--checkpoint``, trains TiM4Rec for one epoch on the dataset first (the authors' beauty
settings: 64d, L 50) in a temporary folder: speed does not depend on how well the model is
trained. The checkpoint reads its dataset from ``--data_path``. Then, median over ``--repeats``:

- **end to end**: ``python recommend.py --checkpoint=... --k=10 --out=...`` as a fresh process:
  start, imports, loading the checkpoint and the data, scoring every user, writing the CSV;
- **scoring**, in one process with the checkpoint and data loaded once, every user of the test
  split: RecBole's full-sort evaluation through the project's trainer (what ``test.py`` runs:
  scores, top 50, metrics) against :func:`pipeline.recommend` with ``history="test"`` (the same
  inputs: scores, top 10, rows) and with ``history="all"`` (the whole history, seen items left
  out); on a GPU timed between synchronisations.

Prints a Markdown table; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_PATH, ROOT, sync_seconds, write_json


def train_checkpoint(data_path: str, dataset: str, device: str, folder: Path) -> str:
    from pipeline.workflow import train

    result = train([ROOT / "config" / "config4beauty_64d.yaml"], {
        "dataset": dataset, "data_path": data_path, "epochs": 1, "show_progress": False,
        "use_gpu": device == "cuda", "checkpoint_dir": str(folder / "saved"),
        "log_dir": str(folder / "log"), "tensorboard_dir": str(folder / "tb")}, quiet=True)
    return result["checkpoint"]


def end_to_end(checkpoint: str, settings: dict, folder: Path, repeats: int) -> list[float]:
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "recommend.py"), f"--checkpoint={checkpoint}",
                        "--k=10", f"--out={folder / f'top10-{i}.csv'}",
                        *(f"--{k}={v}" for k, v in settings.items())], check=True, cwd=ROOT,
                       stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - start)
    return seconds


def scoring(checkpoint: str, settings: dict, repeats: int) -> dict:
    import pipeline
    from pipeline.runlog import RunLog
    from pipeline.trainer import ProjectTrainer

    log = RunLog("ERROR", quiet=True)
    loaded = pipeline.load(checkpoint, {**settings, "show_progress": False})
    device = loaded.config["device"].type
    trainer = ProjectTrainer(loaded.config, loaded.model, run=None)

    jobs = {
        "full-sort evaluation (test.py)":
            lambda: trainer.evaluate(loaded.test_data, load_best_model=False),
        "recommend, history test": lambda: pipeline.recommend(loaded, k=10, history="test"),
        "recommend, history all": lambda: pipeline.recommend(loaded, k=10, history="all"),
    }
    for job in jobs.values():  # warm-up: kernels compiled, caches filled
        job()
    times = {name: [sync_seconds(job, device)[0] for _ in range(repeats)]
             for name, job in jobs.items()}
    users = len(loaded.test_data._dataset)
    log.close()
    return {"users": users, "items": loaded.dataset.item_num - 1, "seconds": times}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data_path", default=str(DATA_PATH))
    parser.add_argument("--dataset", default="amazon-sports")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or train_checkpoint(args.data_path, args.dataset,
                                                         args.device, folder)
        settings = {"use_gpu": args.device == "cuda", "data_path": args.data_path}
        e2e = end_to_end(checkpoint, settings, folder, args.repeats)
        score = scoring(checkpoint, settings, args.repeats)
    card = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    evaluation = statistics.median(score["seconds"]["full-sort evaluation (test.py)"])
    lines = [f"{args.dataset}: {score['users']} users, {score['items']} items, top 10; {card}; "
             f"torch {torch.__version__}", "",
             "| what | median s | runs (s) | / full-sort evaluation |", "|---|---|---|---|",
             f"| end to end (recommend.py, every user, CSV) | {statistics.median(e2e):.2f} | "
             f"{', '.join(f'{s:.2f}' for s in e2e)} | |"]
    for name, times in score["seconds"].items():
        median = statistics.median(times)
        lines.append(f"| scoring: {name} | {median:.3f} | {', '.join(f'{s:.3f}' for s in times)}"
                     f" | {median / evaluation:.2f} |")
    print("\n".join(lines))
    write_json(args.json, {"device": card, "end_to_end_s": e2e, **score})


if __name__ == "__main__":
    main()
