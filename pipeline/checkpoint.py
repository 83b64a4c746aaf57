"""Checkpoints as plain data: they load with ``torch.load(path, weights_only=True)``.

RecBole pickles its whole Config object into each checkpoint, so torch >= 2.6 refuses to load them
by default, and loading one from elsewhere means trusting it to run code. This project's checkpoint
is a dict of tensors, numbers, strings, lists and dicts::

    {"format": "tim4rec-checkpoint", "version": 1,
     "model": str, "config": dict (the settings of the run, see settings.plain_config),
     "epoch": int, "cur_step": int, "best_valid_score": float, "best_valid_result": dict | None,
     "state_dict": {name: tensor}, "optimizer": optimizer.state_dict(), "versions": {name: str}}

The authors' RecBole checkpoints (``config`` a pickled RecBole Config) are read by
:func:`load_recbole_checkpoint`, which unpickles and so must be asked for explicitly.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from pipeline.errors import UserError

FORMAT = "tim4rec-checkpoint"
VERSION = 1

# Settings of an authors' checkpoint that describe their machine, not the model or the data.
_MACHINE_KEYS = {"data_path", "checkpoint_dir", "checkpoint_path", "gpu_id", "use_gpu", "device",
                 "log_wandb", "wandb_project", "dataset_save_path", "dataloaders_save_path"}


def save(path: Path | str, payload: dict) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    os.replace(tmp, path)


def load(path: Path | str, map_location="cpu") -> dict:
    """Load a checkpoint of this project, refusing anything that would need unpickling."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} is not a checkpoint of this project: it needs unpickling to load. If it is a "
            f"RecBole checkpoint from a source you trust, pass --allow-pickle") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (no '{FORMAT}' marker)")
    if data.get("version", 0) > VERSION:
        raise UserError(f"{path} was written by a newer version of this project (format "
                        f"{data['version']}); update the code to read it")
    return data


def load_recbole_checkpoint(path: Path | str, map_location="cpu") -> dict:
    """Read a RecBole checkpoint (e.g. the authors' published weights) into this project's layout.

    This unpickles the file, which can run code: call it only for files the user trusts.
    """
    from pipeline import compat

    compat.apply()  # the pickled Config refers to RecBole classes
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # unpickling surfaces any exception of the pickled classes
        raise UserError(f"cannot read RecBole checkpoint {path}: {error}") from None
    if not isinstance(data, dict) or "state_dict" not in data or "config" not in data:
        raise UserError(f"{path} is not a RecBole checkpoint (no 'config' and 'state_dict')")
    rb_config = data["config"]
    settings = dict(getattr(rb_config, "external_config_dict", {}) or {})
    settings = {k: v for k, v in settings.items() if k not in _MACHINE_KEYS}
    settings["model"] = rb_config["model"]
    settings["dataset"] = rb_config["dataset"]
    return {
        "format": FORMAT, "version": VERSION, "model": rb_config["model"], "config": settings,
        "epoch": data.get("epoch", -1), "cur_step": data.get("cur_step", 0),
        "best_valid_score": data.get("best_valid_score"), "best_valid_result": None,
        "state_dict": data["state_dict"], "optimizer": data.get("optimizer"), "versions": {},
    }
