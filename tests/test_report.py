"""report.py: the comparison table and plots from the results files that runs write."""

import json

import pytest

import report
from pipeline.cli import train_main
from tests.test_cli import cli_args


def fake_run(folder, model, seed, ndcg, seconds, dataset="beauty", config=None, resumed=None,
             name=None):
    result = {
        "run": name or f"{model}-{dataset}-{seed}", "model": model, "dataset": dataset,
        "seed": seed, "resumed_from": resumed,
        "valid_metric": "NDCG@10", "parameters": 1234, "best_epoch": seed,
        "test_result": {"hit@10": 2 * ndcg, "ndcg@10": ndcg},
        "epochs": [{"epoch": e, "train_s": seconds, "train_loss": 1.0, "valid_score": ndcg * e / 3}
                   for e in range(4)],
    }
    if config is not None:
        result["config"] = {"seed": seed, "data_path": f"/data/{seed}", **config}
    (folder / model).mkdir(parents=True, exist_ok=True)
    (folder / model / f"{result['run']}.json").write_text(json.dumps(result))


def test_table_shows_mean_and_spread_over_seeds(tmp_path, capsys):
    fake_run(tmp_path, "TiM4Rec", 1, 0.10, 2.0)
    fake_run(tmp_path, "TiM4Rec", 2, 0.20, 4.0)
    fake_run(tmp_path, "SASRec", 1, 0.05, 1.0)
    (tmp_path / "TiM4Rec" / "broken.json").write_text("{not json")
    report.main(["--runs", str(tmp_path), "--plots", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert ("| model | settings | seeds | hit@10 | ndcg@10 | best epoch | s / epoch | parameters |"
            in out)
    # results without their settings (written by older versions) are grouped, and say so
    assert "| SASRec | settings not recorded | 1 | 0.1000 | 0.0500 | 1.0 | 1.00 | 1,234 |" in out
    assert ("| TiM4Rec | settings not recorded | 1, 2 | 0.3000 ± 0.1414 | 0.1500 ± 0.0707 | "
            "1.5 ± 0.7 | 3.00 ± 1.41 |" in out)
    for name in ("beauty-validation.png", "beauty-epoch-time.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_runs_alike_but_for_the_seed_share_a_row(tmp_path, capsys):
    """Other settings, or a resumed run, make rows of their own, labelled by what differs; where
    runs ran (paths) does not."""
    base = {"learning_rate": 0.001, "is_time": True}
    fake_run(tmp_path, "TiM4Rec", 1, 0.10, 2.0, config=base)
    fake_run(tmp_path, "TiM4Rec", 2, 0.20, 2.0, config=base)
    fake_run(tmp_path, "TiM4Rec", 3, 0.30, 2.0, config={**base, "learning_rate": 0.01})
    fake_run(tmp_path, "TiM4Rec", 4, 0.40, 2.0, config={**base, "is_time": False})
    fake_run(tmp_path, "TiM4Rec", 5, 0.50, 2.0, config=base, resumed="saved/x.pth",
             name="resumed-run")
    report.main(["--runs", str(tmp_path), "--plots", str(tmp_path / "plots")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| TiM4Rec")]
    assert len(rows) == 4
    table = "\n".join(rows)
    assert "| is_time=True, learning_rate=0.001 | 1, 2 | 0.3000 ± 0.1414 |" in table
    assert "| is_time=True, learning_rate=0.01 | 3 | 0.6000 | 0.3000 |" in table
    assert "| is_time=False, learning_rate=0.001 | 4 | 0.8000 | 0.4000 |" in table
    assert "| resumed, is_time=True, learning_rate=0.001 | 5 | 1.0000 | 0.5000 |" in table


def test_no_runs_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--runs", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no finished runs")


def test_a_real_run_is_reported(tiny_data_path, tmp_path, capsys):
    outputs = tmp_path / "out"
    train_main(cli_args(tiny_data_path, outputs, "--epochs=2"))
    (results,) = (outputs / "log" / "TiM4Rec").glob("*.json")
    data = json.loads(results.read_text())
    assert [e["epoch"] for e in data["epochs"]] == [0, 1]
    assert all(e["train_s"] > 0 and "valid_result" in e for e in data["epochs"])
    assert data["best_epoch"] in (0, 1) and data["parameters"] > 0
    capsys.readouterr()
    report.main(["--runs", str(outputs / "log"), "--plots", str(tmp_path / "plots")])
    assert "| TiM4Rec | - | 2020 |" in capsys.readouterr().out
    assert data["config"]["hidden_size"] == 16 and data["resumed_from"] is None
