"""The shared pipeline behind run.py, test.py, recommend.py and every baseline/<Model>/run.py.

config -> data -> model -> training -> evaluation -> checkpoints -> recommendations, on top of
RecBole 1.2.1. The Python API, as RecBole's quick_start::

    from pipeline import train, evaluate, load, recommend
    result = train(["config/config4ml100k_64d.yaml"], {"epochs": 5})   # -> the run's results
    metrics = evaluate(result["checkpoint"])                          # -> valid and test metrics
    loaded = load(result["checkpoint"])        # -> config, model, dataset, loaders, checkpoint
    rows = recommend(loaded, users=["196"], k=10)   # -> DataFrame user_id, rank, item_id, score

Modules:

- :mod:`pipeline.compat`: fixes RecBole for numpy 2, pandas 3 and torch >= 2.6 (applied first).
- :mod:`pipeline.errors`: ``UserError``, bad input that the entry points report in one line.
- :mod:`pipeline.registry`: finds a model by name, this project's first, then RecBole's.
- :mod:`pipeline.settings`: builds the RecBole Config from YAML files and ``--key=value`` overrides.
- :mod:`pipeline.schema`: what each setting accepts, read from its YAML comment.
- :mod:`pipeline.atomic`: reads the interaction file with every row checked.
- :mod:`pipeline.scoring`: the scoring head the models share (loss, predict, full-sort scores).
- :mod:`pipeline.checkpoint`: checkpoints that load with ``torch.load(weights_only=True)``.
- :mod:`pipeline.vocabulary`: the data a checkpoint was trained on, recorded and compared.
- :mod:`pipeline.runlog`: per-run names, the log file and the environment report.
- :mod:`pipeline.trainer`: RecBole's Trainer with those checkpoints and no per-step host syncs.
- :mod:`pipeline.cuda_graph`: the training step captured once as a CUDA graph and replayed.
- :mod:`pipeline.precompile`: a step's Triton kernels compiled side by side before it first runs.
- :mod:`pipeline.autotune`: mamba-ssm's Triton autotune choices, kept once per machine.
- :mod:`pipeline.precision`: mixed precision (``enable_amp``): bfloat16 autocast, no loss scaling.
- :mod:`pipeline.distributed`: data-parallel training over processes (torch.distributed).
- :mod:`pipeline.workflow`: ``train``, ``evaluate`` and ``load``, what a user runs.
- :mod:`pipeline.recommendations`: ``recommend`` and ``export_embeddings``.
- :mod:`pipeline.cli`: argument parsing and error reporting for the entry points.

Importing this package is cheap: torch and RecBole load only when a workflow runs.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: relative paths in configs (data, checkpoints, logs) are resolved
against it."""

_API = {"train": "pipeline.workflow", "evaluate": "pipeline.workflow", "load": "pipeline.workflow",
        "recommend": "pipeline.recommendations", "export_embeddings": "pipeline.recommendations"}
__all__ = ["ROOT", *_API]


def __getattr__(name):  # the API on first use, so that importing the package stays cheap
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
