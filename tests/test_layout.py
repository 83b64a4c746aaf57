"""The project's layout: no import cycle between its modules, no source file too long to read,
and a CPU path that needs no Triton.

Every Python file of the repository is read with ``ast`` (nothing is imported): the root's own,
those of its packages (pipeline/, kernels/, ssd_ops/, tests/), of the baselines (baseline/<Name>/),
of bench/ and of dataset/. Each import, at module level or inside a function, that names one of
these modules is an edge. A folder without ``__init__.py`` (bench/, dataset/, baseline/<Name>/)
holds scripts, which import one another by bare name (``from gpu_speed import ...``): their own
folder is on ``sys.path``, after the root. Imports made from strings (``importlib``) are not seen.
"""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500
NOT_SOURCE = {"__pycache__", "saved", "log", "log_tensorboard", "config"}  # run outputs, YAML


def project_files() -> list[Path]:
    """Every Python file of the project, relative to the root; hidden folders, run outputs and
    prepared datasets (dataset/<name>/) left out."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in NOT_SOURCE
                         and here != Path("dataset"))
        files += [here / name for name in sorted(names) if name.endswith(".py")]
    return files


def module_name(path: Path) -> str:
    """``pipeline/autotune.py`` -> ``pipeline.autotune``; a package's ``__init__.py``: its
    name."""
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(folder: Path) -> bool:
    return (ROOT / folder / "__init__.py").exists()


def imported(node: ast.Import | ast.ImportFrom, path: Path, modules: dict) -> list[str]:
    """The project modules that ``node``, in the file ``path``, loads (its last named module:
    ``import a.b`` loads a.b, ``from a import b`` the submodule a.b or else a)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        targets = [[".".join(n.split(".")[:k]) for k in range(n.count(".") + 1, 0, -1)]
                   for n in names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the file's package, up level - 1 packages
            package = module_name(path).split(".")
            package = package if path.name == "__init__.py" else package[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        targets = [[f"{base}.{alias.name}" if base else alias.name, base]
                   for alias in node.names]
    folder = path.parent
    beside = (folder != Path(".") and not is_package(folder)
              and (isinstance(node, ast.Import) or not node.level))  # a script's bare names
    found = []
    for candidates in targets:
        for name in candidates:
            options = [name, ".".join((*folder.parts, name))] if beside else [name]
            match = next((m for m in options if m in modules), None)
            if match is not None:
                found.append(match)
                break
    return found


def import_graph() -> dict[str, dict[str, tuple[str, int]]]:
    """``{module: {imported module: (file, line)}}`` over the whole project."""
    files = project_files()
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        tree = ast.parse((ROOT / path).read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, path, modules):
                    if target != name:
                        edges.setdefault(target, (str(path), node.lineno))
    return graph


def cycles(graph: dict) -> list[list[str]]:
    """One cycle of each strongly connected group of modules (Tarjan's algorithm), as the list
    of its modules with the first repeated at the end."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # walk inside the group from its first module until one comes again
        path = [min(group)]
        while path.count(path[-1]) < 2:
            path.append(min(w for w in graph[path[-1]] if w in group))
        found.append(path[path.index(path[-1]):])
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert {"ssd", "tim4rec", "pipeline.trainer", "bench.gpu_speed"} <= graph.keys()
    assert "bench.common" in graph["bench.length_study"]  # a bare name between scripts
    found = cycles(graph)
    described = ["\n  ".join(f"{a} -> {b}  ({graph[a][b][0]}:{graph[a][b][1]})"
                             for a, b in itertools.pairwise(cycle)) for cycle in found]
    assert not found, "import cycles:\n  " + "\n\n  ".join(described)


def test_cycles_are_found():
    """The search itself, on a made-up graph: a cycle of three and a module importing itself
    (not a cycle between modules)."""
    graph = {"a": {"b": ("a.py", 1)}, "b": {"c": ("b.py", 1)}, "c": {"a": ("c.py", 1)},
             "d": {"a": ("d.py", 1)}, "e": {"e": ("e.py", 1)}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b": ("a.py", 1)}, "b": {}}) == []


def test_no_source_file_over_the_limit():
    """No Python file outside tests/ over MAX_LINES lines."""
    long = {str(p): n for p in project_files() if p.parts[0] != "tests"
            if (n := len((ROOT / p).read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


NO_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):  # as on a machine without Triton
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTriton())
import torch
import tim4rec  # noqa: F401  (the model, with its compat patches)
from baseline.Mamba4Rec.mamba_block import MambaBlock
from kernels.causal_conv_ref import causal_conv_act_ref  # noqa: F401
from kernels.gated_norm_ref import gated_rmsnorm_ref  # noqa: F401
from kernels.selective_scan_ref import selective_scan_ref  # noqa: F401
from ssd import TimeAwareSSD
from ssd_ops.backend import resolve_backend

assert resolve_backend("auto", "cpu") == "torch"
layer = TimeAwareSSD(d_model=16, max_seq_length=8, d_state=8, head_dim=8, chunk_size=4)
out, _ = layer(torch.randn(2, 8, 16), tau=torch.rand(2, 4, 8))  # tau [B H L]
out.sum().backward()
block = MambaBlock(d_model=16, d_state=8, backend="torch")
block(torch.randn(2, 8, 16)).sum().backward()
assert layer.in_proj.weight.grad is not None  # the step reached the weights: it trained
assert all(parameter.grad is not None for parameter in block.parameters())
print("ok")
"""


def test_the_cpu_path_needs_no_triton():
    """The model, its PyTorch references and Mamba4Rec's CPU block import and train a step on
    the CPU where ``import triton`` fails (Triton is a GPU and test dependency only)."""
    result = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
