"""The shared pipeline behind run.py, test.py and every baseline/<Model>/run.py.

config -> data -> model -> training -> evaluation -> checkpoints, on top of RecBole 1.2.1:

- :mod:`pipeline.compat`: fixes RecBole for numpy 2, pandas 3 and torch >= 2.6 (applied first).
- :mod:`pipeline.registry`: finds a model by name, this project's first, then RecBole's.
- :mod:`pipeline.settings`: builds the RecBole Config from YAML files and ``--key=value`` overrides.
- :mod:`pipeline.checkpoint`: checkpoints that load with ``torch.load(weights_only=True)``.
- :mod:`pipeline.runlog`: per-run names, the log file and the environment report.
- :mod:`pipeline.trainer`: RecBole's Trainer with those checkpoints and no per-step host syncs.
- :mod:`pipeline.distributed`: data-parallel training over processes (torch.distributed).
- :mod:`pipeline.workflow`: ``train`` and ``evaluate_checkpoint``, the two things a user runs.
- :mod:`pipeline.cli`: argument parsing and error reporting for the entry points.

Importing this package is cheap: torch and RecBole load only when a workflow runs.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: relative paths in configs (data, checkpoints, logs) are resolved against it."""
