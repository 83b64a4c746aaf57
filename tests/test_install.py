"""The install: one package list (the requirements files) whose torch and triton pins agree.

Each CUDA build of torch pins one triton release, while the tests need triton for the project's
kernels on the CPU (through Triton's interpreter), where PyTorch's CPU build needs none. The dev
requirements therefore give triton a range, and it must admit the triton of every CUDA torch that
requirements.txt admits, or installing them would make pip change torch. Only the resolution on a
CUDA machine needs the package index (wheel metadata only, no download of torch itself): that test
skips when the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The triton that each CUDA build of torch on PyPI pins (its wheel metadata, Linux x86-64). torch
# 2.9 is the oldest CUDA build whose triton (3.5) mamba-ssm 2.3.2 accepts; 2.14 lies beyond
# requirements.txt's range and shows that its bound is where the triton pin moves on.
CUDA_TORCH_TRITON = {
    "2.9.1": "3.5.1",
    "2.10.0": "3.6.0",
    "2.11.0": "3.6.0",
    "2.12.1": "3.7.1",
    "2.13.0": "3.7.1",
    "2.14.1": "3.8.0",
}


def requirements(name: str) -> dict[str, Requirement]:
    """The named requirements of one file (not those it includes with -r), by project name."""
    found = {}
    for line in (ROOT / name).read_text().splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            found[req.name] = req
    return found


def pip(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def installs(result: subprocess.CompletedProcess) -> dict[str, str]:
    """Name -> version of what a `pip install --dry-run --report -` would install."""
    report = json.loads(result.stdout)
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}


def test_dev_triton_range_admits_exactly_the_triton_of_each_admitted_cuda_torch():
    torch = requirements("requirements.txt")["torch"].specifier
    triton = requirements("requirements-dev.txt")["triton"].specifier
    for torch_version, triton_version in CUDA_TORCH_TRITON.items():
        assert (torch_version in torch) == (triton_version in triton), (
            f"torch {torch_version} (CUDA) pins triton {triton_version}; requirements.txt "
            f"{'admits' if torch_version in torch else 'excludes'} that torch, "
            f"requirements-dev.txt's triton{triton} does not agree"
        )


def test_every_list_is_read_from_the_requirements_files():
    """The Makefile, environment.yaml and pyproject.toml name no package of their own."""
    makefile = (ROOT / "Makefile").read_text()
    pip_lines = re.findall(r"\$\(PIP\) install (.*)", makefile)
    assert len(pip_lines) >= 4
    for line in pip_lines:
        args = [w for w in line.split() if not w.startswith("--")]
        assert args == ["pip"] or (len(args) == 2 and args[0] == "-r"), line  # pip: --upgrade
    assert re.search(r"--no-deps -r requirements-recbole\.txt", makefile)
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-gpu.txt"):
        assert f"-r {name}" in makefile
    environment = yaml.safe_load((ROOT / "environment.yaml").read_text())
    assert {"pip": ["-r requirements-dev.txt"]} in environment["dependencies"]
    assert "recbole" not in requirements("requirements.txt")  # its pinned ray would come too
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dependencies = { file = ["requirements.txt"] }' in pyproject


def make_commands(venv: Path, target: str) -> list[str]:
    """What ``make -n target`` would run with the venv at ``venv`` (nothing runs). Under a
    ``make test``, the outer make's flags are left out."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "-n", "--no-print-directory", f"VENV={venv}", "ARGS=", target],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                            check=True)
    return result.stdout.splitlines()


def test_make_installs_again_only_after_a_list_changed(tmp_path):
    """``make test`` installs into a new venv, not into one whose stamps are newer than every
    requirements file; a dev stamp older than its lists installs the dev list alone."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()

    def installs():
        return [c for c in make_commands(venv, "test") if " install " in c]

    assert len(installs()) == 4  # pip itself, the runtime list, RecBole, the dev list
    newest = max((ROOT / name).stat().st_mtime for name in (
        "requirements.txt", "requirements-recbole.txt", "requirements-dev.txt"))
    for stamp in (".installed", ".installed-dev"):
        (venv / stamp).touch()
        os.utime(venv / stamp, (newest + 10, newest + 10))
    assert installs() == []
    assert make_commands(venv, "test") == [f"{venv}/bin/python -m pytest "]
    os.utime(venv / ".installed-dev", (newest - 10, newest - 10))  # older than its lists
    assert installs() == [f"{venv}/bin/python -m pip install --quiet -r requirements-dev.txt"]


def test_installed_environment_is_what_the_dev_lists_ask():
    """Installing the dev lists again, from no index at all, leaves torch and everything else."""
    result = pip("install", "--dry-run", "--no-index", "--quiet", "--report", "-",
                 "-r", "requirements-dev.txt", timeout=120)
    if result.returncode != 0:
        pytest.skip("this environment lacks part of requirements-dev.txt (not made by `make "
                    f"test`): {result.stderr.strip().splitlines()[-1:]}")
    assert installs(result) == {}
    recbole = pip("install", "--dry-run", "--no-index", "--no-deps", "--quiet", "--report", "-",
                  "-r", "requirements-recbole.txt", timeout=120)
    assert recbole.returncode == 0 and installs(recbole) == {}, recbole.stderr


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_dev_requirements_keep_the_cuda_torch_that_requirements_txt_installs():
    """On a Linux GPU machine, `make train` installs the newest CUDA torch that requirements.txt
    admits and `make test` must keep it: resolve both lists for that platform from wheel metadata
    (pip --dry-run downloads no wheel where the index publishes metadata files, as PyPI does)."""
    if not pypi_reachable():
        pytest.skip("pypi.org is not reachable")
    torch = requirements("requirements.txt")["torch"].specifier
    newest = max((Version(v) for v in CUDA_TORCH_TRITON if v in torch))
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(5, 29)] + ["manylinux2014_x86_64"]
    result = pip("install", "--dry-run", "--quiet", "--report", "-", "--ignore-installed",
                 "--only-binary=:all:", "--python-version", "3.12",
                 *[arg for p in platforms for arg in ("--platform", p)],
                 f"torch=={newest}", "-r", "requirements-dev.txt", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = installs(result)
    assert resolved["torch"] == str(newest)
    assert resolved["triton"] == CUDA_TORCH_TRITON[str(newest)]
