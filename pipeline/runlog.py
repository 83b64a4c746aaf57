"""Per-run names, the log file, and the environment report.

Each run gets one name, ``<model>-<dataset>-<YYYYmmdd-HHMMSS>-<4 hex>``, shared by its checkpoint
(``saved/<name>.pth``), its log and results (``log/<model>/<name>.log`` and ``.json``) and its
TensorBoard folder (``log_tensorboard/<name>``). RecBole names checkpoints by the second alone, so
two runs started in the same second overwrite each other and the second one then tests the first
one's weights; the random suffix, checked against existing files, rules that out.

Until :meth:`RunLog.commit` the log is held in memory: a run commits it once it has trained its
first epoch, so a run that ends before (bad input, an error, Ctrl-C) leaves no file behind.
:func:`check_writable` finds unusable output folders before anything is loaded.
"""

from __future__ import annotations

import logging
import platform
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.errors import Terminated, UserError

FILE_FORMAT = "%(asctime)s %(levelname)s  %(message)s"
CONSOLE_FORMAT = "%(asctime)s %(levelname)s  %(message)s"


@dataclass(frozen=True)
class RunPaths:
    name: str
    checkpoint: Path
    log_file: Path
    tensorboard_dir: Path

    @property
    def results(self) -> Path:
        """The run's results as JSON, beside its log (read by report.py)."""
        return self.log_file.with_suffix(".json")


def new_run(model: str, dataset: str, checkpoint_dir, log_dir, tensorboard_dir) -> RunPaths:
    """A fresh run name whose checkpoint, log and TensorBoard paths are all unused."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    while True:
        name = f"{model}-{dataset}-{stamp}-{secrets.token_hex(2)}"
        paths = RunPaths(name, Path(checkpoint_dir) / f"{name}.pth",
                         Path(log_dir) / model / f"{name}.log", Path(tensorboard_dir) / name)
        if not (paths.checkpoint.exists() or paths.log_file.exists()
                or paths.tensorboard_dir.exists()):
            return paths


OUTPUT_KEYS = ("checkpoint_dir", "log_dir", "tensorboard_dir")


def check_writable(folder, setting: str) -> None:
    """UserError unless ``folder`` is a folder (existing, or one that can be made) where this
    process can create files: tried, since permissions alone do not tell (root, read-only
    mounts)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{setting} {folder} cannot be a folder: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{setting} {folder} is not writable: cannot create files in {existing} "
                        f"({error.strerror})") from None


class _Buffer(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class RunLog:
    """Console logging at once; the file log from :meth:`commit` on, with what came before it."""

    def __init__(self, level: str | None = "INFO", quiet: bool = False, stream=None):
        self.root = logging.getLogger()
        self.root.setLevel(getattr(logging, str(level or "INFO").upper(), logging.INFO))
        for handler in list(self.root.handlers):  # a second run in one process starts clean
            if getattr(handler, "_tim4rec", False):
                self.root.removeHandler(handler)
                handler.close()
        self.buffer = self._own(_Buffer())
        if not quiet:
            self._own(logging.StreamHandler(stream or sys.stdout)).setFormatter(
                logging.Formatter(CONSOLE_FORMAT, "%d %b %H:%M:%S"))
        self.file_handler = None

    def _own(self, handler):
        handler._tim4rec = True
        self.root.addHandler(handler)
        return handler

    def commit(self, log_file: Path) -> None:
        from recbole.utils.logger import RemoveColorFilter  # RecBole colours its messages

        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FILE_FORMAT, "%a %d %b %Y %H:%M:%S"))
        handler.addFilter(RemoveColorFilter())
        for record in self.buffer.records:
            handler.handle(record)
        self.root.removeHandler(self.buffer)
        self.file_handler = self._own(handler)

    @property
    def committed(self) -> bool:
        return self.file_handler is not None

    def record_failure(self, error: BaseException) -> None:
        """Put what ends a run early into its log file (the console hears of it from the CLI)."""
        if self.file_handler is None:
            return
        if isinstance(error, KeyboardInterrupt):
            message = "run stopped: interrupted (Ctrl-C)"
        elif isinstance(error, Terminated):
            message = "run stopped: terminated (SIGTERM)"
        else:
            message = f"run failed: {error!r}"
        self.file_handler.handle(logging.makeLogRecord(
            {"levelno": logging.ERROR, "levelname": "ERROR", "msg": message}))

    def close(self) -> None:
        for handler in list(self.root.handlers):
            if getattr(handler, "_tim4rec", False):
                self.root.removeHandler(handler)
                handler.close()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device) -> dict:
    """What a reader of the log needs to reproduce the run."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "recbole": _version("recbole"),
        "mamba-ssm": _version("mamba-ssm"),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "pandas": _version("pandas"),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["cpu threads"] = str(torch.get_num_threads())
    return info
