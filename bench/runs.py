"""Training runs of ``run.py`` in child processes, for the benchmark scripts that compare runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str], log_dir: Path) -> subprocess.Popen:
    """``python run.py ARGS`` writing its log and results file under ``log_dir``."""
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"--log_dir={log_dir}",
                             "--show_progress=False", *args], cwd=ROOT)


def results(log_dir: Path) -> dict:
    """The results file (``log/<model>/<run>.json``) that the run under ``log_dir`` wrote."""
    (path,) = log_dir.rglob("*.json")
    return json.loads(path.read_text())


def publish(lines: list[str], runs: list[dict], json_path: Path | None) -> None:
    """Print a Markdown table and, with ``json_path``, write the runs' results beside it."""
    print("\n".join(lines))
    if json_path:
        json_path.write_text(json.dumps(runs, indent=1))
