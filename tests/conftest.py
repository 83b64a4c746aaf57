"""Shared fixtures: a tiny real-shaped dataset, so every test runs in seconds on a 2-core CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def write_inter(path: Path, n_users: int = 40, n_items: int = 30, seed: int = 0) -> None:
    """A RecBole atomic .inter file with 8..16 interactions per user and increasing Unix times.

    Items are drawn from a skewed distribution so that every item passes a 5-core filter and the
    next item is partly predictable from the previous one (a model that learns beats random).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, n_users + 1):
        length = int(rng.integers(8, 17))
        t = 1_000_000_000 + int(rng.integers(0, 10_000_000))
        item = int(rng.integers(1, n_items + 1))
        for _ in range(length):
            t += int(rng.integers(60, 86_400 * 30))
            rows.append(f"{user}\t{item}\t{t}")
            item = item % n_items + 1 if rng.random() < 0.6 else int(rng.integers(1, n_items + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")


TIM4REC_SIZES = ("d_state", "head_dim", "chunk_size")  # TiM4Rec's and SSD4Rec's, no other model's


def for_model(model: str, settings: dict) -> dict:
    """Tiny-run settings without those that ``model`` does not have (a run refuses them): the
    SSD sizes but for SSD4Rec; Caser's width is embedding_size, not hidden_size."""
    unknown = set() if model in ("TiM4Rec", "SSD4Rec") else set(TIM4REC_SIZES)
    settings = {k: v for k, v in settings.items() if k not in unknown}
    if model == "Caser" and "hidden_size" in settings:
        settings["embedding_size"] = settings.pop("hidden_size")
    return settings


@pytest.fixture(scope="session")
def tiny_data_path(tmp_path_factory) -> Path:
    """A data_path holding dataset ``tiny`` (tiny/tiny.inter)."""
    root = tmp_path_factory.mktemp("data")
    write_inter(root / "tiny" / "tiny.inter")
    return root


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    # RecBole's Config parses sys.argv; pytest's own flags must not leak into it.
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


def interpreted_errors(script: Path) -> dict:
    """Run a script of kernel checks through Triton's interpreter on the CPU (chosen before triton
    is imported: a process of its own) and return the errors it prints last, as JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
