"""Checkpoints as plain data: they load with ``torch.load(path, weights_only=True)``.

RecBole pickles its whole Config object into each checkpoint, so torch >= 2.6 refuses to load them
by default, and loading one from elsewhere means trusting it to run code. This project's checkpoint
is a dict of tensors, numbers, strings, lists and dicts::

    {"format": "tim4rec-checkpoint", "version": 2,
     "model": str, "config": dict (the settings of the run, see settings.plain_config),
     "run": str, "resumed_from": str | None (the checkpoint this run resumed, if any),
     "epoch": int, "cur_step": int, "best_valid_score": float, "best_valid_result": dict | None,
     "state_dict": {name: tensor}, "optimizer": optimizer.state_dict()   (the best epoch's),
     "last": {"epoch", "cur_step", "state_dict", "optimizer"}   (the state the run ended in, where
             that is not the best one; written when the run ends, however it ends but killed),
     "data": dict (the vocabularies of the data it was trained on: pipeline.vocabulary),
     "versions": {name: str}}

Version 1 (before ``run``, ``resumed_from``, ``last`` and ``data``) still loads. The authors'
RecBole checkpoints (``config`` a pickled RecBole Config) are read by
:func:`load_recbole_checkpoint`, which unpickles and so must be asked for explicitly.

Writing is atomic and durable: the file is written under a temporary name, flushed to disk, then
renamed, so a crash at any moment leaves the previous checkpoint or the new one, never a mix. The
temporary file is locked while it is written, so :func:`remove_stale_temporaries` can tell one of a
dead run (removed) from one being written (kept).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import time
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.settings import PLACE_KEYS

FORMAT = "tim4rec-checkpoint"
VERSION = 2
TEMPORARY_SUFFIX = ".tmp"

# How torch.save's files begin: a zip archive (torch >= 1.6) or a pickle (older torch, RecBole).
_MAGIC = (b"PK\x03\x04", b"\x80")


@contextlib.contextmanager
def write_atomically(path: Path | str, mode: str = "wb"):
    """``with write_atomically(path) as f``: write a file under a temporary name beside ``path``
    (locked while written), flush it to disk and rename it to ``path``; on any error the temporary
    file is removed, so ``path`` holds the previous file or the whole new one, never a mix. How
    every output of the project is written (checkpoints, results files, recommendations,
    embeddings)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with open(tmp, mode, **text) as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # held until closed: the writer is alive
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def save(path: Path | str, payload: dict) -> None:
    """Write ``payload`` (with the format marker) to ``path``, atomically and durably."""
    with write_atomically(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, f)


def remove_stale_temporaries(folder: Path | str, min_age_s: float = 60.0) -> list[Path]:
    """Remove the temporary files (:func:`write_atomically`) whose writer died, killed while
    writing: those nobody holds locked and older than ``min_age_s`` (a writer locks its file just
    after creating it). Returns the removed paths."""
    removed = []
    for tmp in Path(folder).glob(f".*.[0-9]*{TEMPORARY_SUFFIX}"):  # .NAME.PID.tmp
        try:
            if time.time() - tmp.stat().st_mtime < min_age_s:
                continue
            with open(tmp, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer holds it
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    return removed


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise UserError(f"{path} is empty: not a checkpoint")
    if not head.startswith(_MAGIC):
        raise UserError(f"{path} is not a checkpoint: it is not a file written by torch.save")


def load(path: Path | str, map_location="cpu") -> dict:
    """Load a checkpoint of this project, refusing anything that would need unpickling."""
    path = Path(path)
    _check_readable(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} is not a checkpoint of this project: it needs unpickling to load. If it is a "
            f"RecBole checkpoint from a source you trust, pass --allow-pickle") from None
    except Exception as error:  # noqa: BLE001 (a damaged file surfaces many exception types)
        raise UserError(f"cannot read checkpoint {path}: {type(error).__name__}: "
                        f"{str(error)[:200] or 'the file is damaged'}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (no '{FORMAT}' marker)")
    if data.get("version", 0) > VERSION:
        raise UserError(f"{path} was written by a newer version of this project (format "
                        f"{data['version']}); update the code to read it")
    return data


def resume_state(data: dict) -> dict:
    """The state a run resumed from ``data`` continues: the last one where it was kept, else the
    best one (``epoch``, ``cur_step``, ``state_dict``, ``optimizer``)."""
    return data.get("last") or {k: data[k] for k in ("epoch", "cur_step", "state_dict",
                                                     "optimizer")}


def load_recbole_checkpoint(path: Path | str, map_location="cpu") -> dict:
    """Read a RecBole checkpoint (e.g. the authors' published weights) into this project's layout.

    This unpickles the file, which can run code: call it only for files the user trusts. It has no
    ``data``: nothing tells which item numbering its weights follow.
    """
    from pipeline import compat

    compat.apply()  # the pickled Config refers to RecBole classes
    path = Path(path)
    _check_readable(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # unpickling surfaces any exception of the pickled classes
        raise UserError(f"cannot read RecBole checkpoint {path}: {type(error).__name__}: "
                        f"{str(error)[:200]}") from None
    if not isinstance(data, dict) or "state_dict" not in data or "config" not in data:
        raise UserError(f"{path} is not a RecBole checkpoint (no 'config' and 'state_dict')")
    rb_config = data["config"]
    settings = dict(getattr(rb_config, "external_config_dict", {}) or {})
    settings = {k: v for k, v in settings.items() if k not in PLACE_KEYS}
    settings["model"] = rb_config["model"]
    settings["dataset"] = rb_config["dataset"]
    return {
        "format": FORMAT, "version": VERSION, "model": rb_config["model"], "config": settings,
        "epoch": data.get("epoch", -1), "cur_step": data.get("cur_step", 0),
        "best_valid_score": data.get("best_valid_score"), "best_valid_result": None,
        "state_dict": data["state_dict"], "optimizer": data.get("optimizer"), "versions": {},
        "recbole": True,
    }
