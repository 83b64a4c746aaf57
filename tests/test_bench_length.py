"""bench/length_study.py: its batches are RecBole's training samples (bench/common.py), its
report, and a smoke run of the whole study on the CPU (real data: skipped without
../shared/datasets)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, SHARED_DATASETS

SCRIPT = ROOT / "bench" / "length_study.py"
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))  # as when the scripts run: python bench/X.py

import common  # noqa: E402
import length_study as study  # noqa: E402


def _rows(items, times, targets, lengths):
    return sorted((tuple(i.tolist()), tuple(t.tolist()), int(y), int(n))
                  for i, t, y, n in zip(items, times, targets, lengths))


@pytest.mark.parametrize("length", [3, 6, 20])
def test_samples_are_recboles_training_samples(tiny_data_path, length):
    """Every sample of ``fill: real`` is one of RecBole's training samples at L (items, times,
    target, length), and together they are all of them; ``full`` keeps those of length L."""
    from recbole.data import create_dataset, data_preparation

    from pipeline.settings import CONFIG_DIR, build_config

    config, _ = build_config("TiM4Rec", [CONFIG_DIR / study.CONFIG_FILE], {
        "dataset": "tiny", "data_path": str(tiny_data_path), "MAX_ITEM_LIST_LENGTH": length,
        "use_gpu": False, "show_progress": False, "state": "WARNING"})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    feat = train_data.dataset.inter_feat
    theirs = _rows(feat["item_id_list"], feat["timestamp_list"], feat["item_id"],
                   feat["item_length"])

    _, arrays = common.load_interactions(study.CONFIG_FILE, tiny_data_path, "tiny")
    target, lengths = common.training_samples(arrays["user"], length, "real")
    items, times = common.inputs(arrays, target, lengths, length)
    assert _rows(items, times, arrays["item"][target], lengths) == theirs

    full_target, full_lengths = common.training_samples(arrays["user"], length, "full")
    assert (full_lengths == length).all()
    assert len(full_target) == sum(1 for row in theirs if row[3] == length)


def test_drawn_batches(tiny_data_path):
    _, arrays = common.load_interactions(study.CONFIG_FILE, tiny_data_path, "tiny")
    data = common.draw_batches(arrays, 6, 16, "full", study.BATCHES)
    assert data["items"].shape == (study.BATCHES, 16, 6) and data["times"].dtype == torch.float32
    assert (data["lengths"] == 6).all() and (data["items"] > 0).all()
    # The tiny histories are shorter than 20.
    real = common.draw_batches(arrays, 20, 16, "real", study.BATCHES)
    padded = real["items"] == 0
    assert padded.any()
    assert torch.equal(padded, torch.arange(20) >= real["lengths"][..., None])  # on the right
    # Nobody is that long.
    assert "items" not in common.draw_batches(arrays, 100, 16, "full", study.BATCHES)


def test_slope_and_tables_report_out_of_memory():
    lengths = [200, 400, 800]
    info = {L: {"batch": 102_400 // L} for L in lengths}
    results = [{"model": "TiM4Rec", "length": L, "default": "graph",
                "rows": {"graph": {"step_ms": 2.0 * L ** 0.5, "peak_gb": 1.0},
                         "eager": {"step_ms": 3.0 * L ** 0.5, "peak_gb": 2.0}}}
               for L in lengths]
    results += [{"model": "SASRec", "length": L, "default": "graph",
                 "rows": {"graph": {"step_ms": 1.0 * L, "peak_gb": 4.0}}} for L in lengths[:2]]
    results.append({"model": "SASRec", "length": 800, "default": "graph",
                    "rows": {"graph": {"error": common.OUT_OF_MEMORY}}})
    models = ["TiM4Rec", "SASRec"]
    summary = study.summarize(results, models, lengths)
    assert summary["TiM4Rec"]["slope"] == pytest.approx(0.5)
    assert summary["SASRec"]["slope"] == pytest.approx(1.0)  # over the lengths that ran
    table = study.markdown(results, models, lengths, info, summary)
    main = table[table.index("Main table"):]
    assert "| TiM4Rec (graph) | 28.3 ms / 1.00 GB | 40.0 ms / 1.00 GB |" in main
    assert "| SASRec (graph) | 200.0 ms / 4.00 GB | 400.0 ms / 4.00 GB | out of memory |" in main
    assert "| TiM4Rec, eager | 42.4 ms / 2.00 GB |" in table
    assert "shorter than SASRec's at every L >= 400 (out of memory counts as longer): yes" in table


def test_error_text_names_out_of_memory():
    assert common.error_text(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")
                             ) == common.OUT_OF_MEMORY
    assert common.error_text(RuntimeError("capture failed: CUDA error: out of memory")) == (
        common.OUT_OF_MEMORY)
    assert common.error_text(ValueError("bad")) == "ValueError: bad"


@pytest.mark.skipif(not (SHARED_DATASETS / "ml-1m-half").is_dir(), reason="needs ../shared")
def test_study_runs_on_the_cpu(tmp_path):
    out, png = tmp_path / "study.json", tmp_path / "study.png"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device=cpu", "--lengths=16", "--tokens=256",
         "--steps=1", "--models=TiM4Rec,SASRec-sdpa", f"--data_path={SHARED_DATASETS}",
         f"--json={out}", f"--png={png}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["settings"]["fill"] == "full" and data["environment"]["device"] == "cpu"
    assert {L: v["batch"] for L, v in data["batches"].items()} == {"16": 16}
    assert all(v["real_fraction"] == 1.0 for v in data["batches"].values())
    cells = {(r["model"], r["length"]): r for r in data["results"]}
    assert set(cells) == {("TiM4Rec", 16), ("SASRec-sdpa", 16)}
    for result in cells.values():
        assert result["default"] == "eager" and list(result["rows"]) == ["eager"]
        assert result["rows"]["eager"]["step_ms"] > 0
    assert png.stat().st_size > 0
    last = run.stdout.rstrip().splitlines()
    assert last[-2].startswith("| TiM4Rec (eager) |") and last[-1].startswith("| SASRec-sdpa")
    assert np.isfinite(cells["TiM4Rec", 16]["rows"]["eager"]["first_s"])
