"""The entry points: bad input gives one line on stderr, exit status 2, no traceback, no files."""

import subprocess
import sys

import pytest

from pipeline import ROOT
from pipeline.cli import test_main as evaluate_main  # (not "test_*": pytest would collect it)
from pipeline.cli import train_main
from tests.conftest import for_model

TINY_MODEL = ["--hidden_size=16", "--d_state=8", "--head_dim=8", "--chunk_size=4",
              "--MAX_ITEM_LIST_LENGTH=10", "--topk=[5,10]", "--show_progress=False",
              "--use_gpu=False", "--state=ERROR"]


@pytest.fixture()
def outputs(tmp_path):
    return tmp_path / "out"


def cli_args(data_path, outputs, *extra):
    """Arguments of a tiny run; ``extra`` --key=value replace the defaults of the same key."""
    args = ["--dataset=tiny", f"--data_path={data_path}", f"--checkpoint_dir={outputs / 'saved'}",
            f"--log_dir={outputs / 'log'}", f"--tensorboard_dir={outputs / 'tb'}", *TINY_MODEL]
    replaced = {e.split("=")[0] for e in extra}
    return [a for a in args if a.split("=")[0] not in replaced] + list(extra)


def written_files(folder):
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def run_and_fail(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--model=NoSuchModel"], "unknown model 'NoSuchModel'"),
    (["--config=no/such/file.yaml"], "config file not found"),
    (["--head_dim=12"], "head_dim (12) must divide"),
    (["--chunk_size=6"], "chunk_size must be a power of two"),
    (["--load_col={'inter': ['user_id', 'item_id']}", "--eval_args={'order': 'RO'}"],
     "column 'timestamp' is needed by is_time"),
    (["--load_col={'inter': ['user_id', 'item_id']}", "--is_time=False"],
     "needed by ordering by time"),
    (["--dataset=no-such-dataset"], "no folder"),
    (["stray"], "unrecognised argument 'stray'"),
    (["--topk=[10,100]"], "topk [10, 100] needs more items"),
    (["--topk=[5]"], "valid_metric NDCG@10 is not computed"),
    (["--cuda_graph=sometimes"], "cuda_graph must be one of auto, True, False, got 'sometimes'"),
    (["--compile_ahead=maybe"], "compile_ahead must be True or False, got 'maybe'"),
    (["--nproc=0"], "--nproc must be at least 1"),
    (["--nproc=2", "--dataset=no-such-dataset"], "no folder"),  # said before any process starts
])
def test_bad_training_input(extra, message, tiny_data_path, outputs, capsys):
    err = run_and_fail(train_main, cli_args(tiny_data_path, outputs, *extra), capsys)
    assert message in err
    assert written_files(outputs) == []


def test_missing_atomic_file_names_the_folder(tiny_data_path, tmp_path, outputs, capsys):
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    err = run_and_fail(train_main, cli_args(tmp_path / "data", outputs), capsys)
    assert f"no atomic file tiny.inter in {tmp_path / 'data' / 'tiny'}" in err


def test_malformed_config_file(tiny_data_path, tmp_path, outputs, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: [64\n")
    err = run_and_fail(train_main, cli_args(tiny_data_path, outputs, f"--config={bad}"), capsys)
    assert "is not valid YAML" in err


def test_checkpoint_errors(tiny_data_path, outputs, tmp_path, capsys):
    train_main(cli_args(tiny_data_path, outputs, "--epochs=1"))
    capsys.readouterr()
    (ckpt,) = (outputs / "saved").glob("*.pth")
    err = run_and_fail(evaluate_main, [f"--checkpoint={ckpt}", "--hidden_size=32"], capsys)
    assert "does not match the model" in err and "size mismatch" in err
    err = run_and_fail(evaluate_main, [f"--checkpoint={tmp_path / 'missing.pth'}"], capsys)
    assert "checkpoint not found" in err
    err = run_and_fail(evaluate_main, [], capsys)
    assert "--checkpoint" in err


def test_test_py_prints_metrics(tiny_data_path, outputs, capsys):
    train_main(cli_args(tiny_data_path, outputs, "--epochs=1"))
    (ckpt,) = (outputs / "saved").glob("*.pth")
    capsys.readouterr()
    evaluate_main([f"--checkpoint={ckpt}", "--state=ERROR"])
    out = capsys.readouterr().out
    assert "TiM4Rec on tiny" in out and "| @k | hit | ndcg | mrr |" in out and "| 10 |" in out


def test_scripts_report_errors_without_traceback(tiny_data_path, outputs):
    for script in ("run.py", "test.py"):
        args = (cli_args(tiny_data_path, outputs, "--model=NoSuchModel") if script == "run.py"
                else ["--checkpoint=missing.pth"])
        proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                              text=True, cwd=ROOT / "baseline", timeout=300)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr


BASELINES = ["SASRec", "BERT4Rec", "GRU4Rec", "Caser", "TiSASRec", "LRURec", "Mamba4Rec", "SSD4Rec"]


def baseline_args(data_path, outputs, model, *extra):
    """A tiny run's arguments for a baseline, without the settings it does not have."""
    pairs = dict(a[2:].split("=", 1) for a in cli_args(data_path, outputs, *extra))
    return [f"--{k}={v}" for k, v in for_model(model, pairs).items()]


@pytest.mark.parametrize("model", BASELINES)
def test_every_baseline_trains_an_epoch_from_the_root(model, tiny_data_path, outputs):
    train_main(baseline_args(tiny_data_path, outputs, model, f"--model={model}", "--epochs=1"))
    (ckpt,) = (outputs / "saved").glob(f"{model}-tiny-*.pth")
    assert (outputs / "log" / model / f"{ckpt.stem}.log").is_file()


def test_a_baseline_trains_from_its_folder(tiny_data_path, outputs):
    proc = subprocess.run([sys.executable, "run.py",
                           *baseline_args(tiny_data_path, outputs, "GRU4Rec", "--epochs=1")],
                          capture_output=True, text=True, cwd=ROOT / "baseline" / "GRU4Rec",
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((outputs / "saved").glob("GRU4Rec-tiny-*.pth"))) == 1
