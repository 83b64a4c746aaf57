"""Bad input, by family (data, settings, checkpoints, outputs): one line on stderr, exit status 2,
nothing written; and runs that end abruptly (killed while saving, SIGTERM, two resumes at once)
never lose or damage a checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import ROOT
from pipeline.cli import test_main as evaluate_main  # (not "test_*": pytest would collect it)
from pipeline.cli import train_main
from tests.conftest import write_inter
from tests.test_cli import cli_args, run_and_fail, written_files

HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


def dataset_with(tmp_path, edit) -> Path:
    """A data_path holding dataset ``tiny`` whose file is the fixture's, changed by ``edit``
    (lines -> lines, the header first)."""
    path = tmp_path / "data" / "tiny" / "tiny.inter"
    write_inter(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))
    return tmp_path / "data"


def with_row(row: str):
    return lambda lines: lines[:6] + [row] + lines[6:]


DATA_CASES = {
    "header without types": (lambda lines: ["user_id\titem_id\ttimestamp\n"] + lines[1:],
                             "header column 'user_id' has no type"),
    "non-numeric time": (with_row("3\t4\tabc\n"),
                         "line 7 has a float column timestamp that is not a number: 'abc'"),
    "empty time": (with_row("3\t4\t\n"), "line 7 has no value for timestamp"),
    "NaN time": (with_row("3\t4\tNaN\n"), "line 7 has a float column timestamp that is not a "
                                          "number: 'NaN'"),
    "short line": (with_row("3\t4\n"), "line 7 has no value for timestamp"),
    "long line": (with_row("3\t" + "x" * 200_000 + "\t1\n"), "line 7 is over 128 KB"),
    "extra field": (with_row("3\t4\t5\t6\n"), "Expected 3 fields in line 7, saw 4"),
    "header only": (lambda lines: lines[:1], "has a header and no rows"),
    "comma-separated": (lambda lines: [line.replace("\t", ",") for line in lines],
                        "the header is separated by commas, not by field_separator '\\t'"),
    "filters empty it": (lambda lines: [HEADER] + [f"{u}\t{3 * u + j}\t{1000 + j}\n"
                                                   for u in range(1, 11) for j in range(3)],
                         "the filters left no interactions (before them: 30 rows, 10 users, 30 "
                         "items); filters: user_inter_num_interval [5,inf), item_inter_num_"
                         "interval [5,inf)"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(case, tmp_path, capsys):
    edit, message = DATA_CASES[case]
    outputs = tmp_path / "out"
    err = run_and_fail(train_main, cli_args(dataset_with(tmp_path, edit), outputs, "--epochs=1"),
                       capsys)
    assert message in err
    assert written_files(outputs) == []


def test_bad_rows_can_be_dropped_and_duplicates_are_counted(tmp_path):
    from pipeline.workflow import train

    def edit(lines):
        return lines[:6] + ["3\t4\t\n", "5\t6\tabc\n"] + lines[6:] + lines[1:21]  # 20 repeats

    data_path = dataset_with(tmp_path, edit)
    settings = {"dataset": "tiny", "data_path": str(data_path), "epochs": 1, "use_gpu": False,
                "MAX_ITEM_LIST_LENGTH": 10, "hidden_size": 16, "d_state": 8, "head_dim": 8,
                "chunk_size": 4, "topk": [5, 10], "show_progress": False,
                "checkpoint_dir": str(tmp_path / "s"), "log_dir": str(tmp_path / "l"),
                "tensorboard_dir": str(tmp_path / "t"), "invalid_rows": "drop"}
    kept = train(overrides=settings, quiet=True)
    log = Path(kept["log"]).read_text()
    assert "left out 2 rows with a missing or non-numeric value" in log
    assert "20 of" in log and "rows repeat an earlier (user, item, time) row" in log
    dropped = train(overrides={**settings, "duplicate_rows": "drop"}, quiet=True)
    assert "left out 20 rows repeating an earlier" in Path(dropped["log"]).read_text()
    assert dropped["train_samples"] < kept["train_samples"]


SETTINGS_CASES = [
    (["--hiden_size=128"], "unknown setting 'hiden_size': did you mean hidden_size?"),
    (["--max_item_list_length=20"], "did you mean MAX_ITEM_LIST_LENGTH?"),
    (["--hidden_size=abc"], "hidden_size must be an integer, got 'abc'"),
    (["--train_batch_size=0"], "train_batch_size must be >= 1, got 0"),
    (["--MAX_ITEM_LIST_LENGTH=0"], "MAX_ITEM_LIST_LENGTH must be >= 1, got 0"),
    (["--learning_rate=-1"], "learning_rate must be > 0, got -1"),
    (["--epochs=0"], "epochs must be >= 1, got 0"),
    (["--dropout_prob=1.0"], "dropout_prob must be in [0, 1), got 1.0"),
    (["--is_time=yes"], "is_time must be True or False, got 'yes'"),
    (["--learner=adamm"], "learner must be one of adam, adamw, sgd, adagrad, rmsprop, "
                          "sparse_adam, got 'adamm'"),
    (["--invalid_rows=skip"], "invalid_rows must be one of error, drop, got 'skip'"),
    (["--model=SASRec", "--d_state=16"], "is not a setting of SASRec"),  # TiM4Rec's (head_dim...)
]


@pytest.mark.parametrize("extra,message", SETTINGS_CASES)
def test_bad_settings(extra, message, tiny_data_path, tmp_path, capsys):
    outputs = tmp_path / "out"
    err = run_and_fail(train_main, cli_args(tiny_data_path, outputs, *extra), capsys)
    assert message in err
    assert written_files(outputs) == []


def test_a_config_file_with_an_unknown_key_is_refused(tiny_data_path, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("hidden_size: 16\nnum_layerz: 3\n")
    err = run_and_fail(train_main, cli_args(tiny_data_path, tmp_path / "out", f"--config={config}"),
                       capsys)
    assert f"config file {config}: unknown setting 'num_layerz': did you mean num_layers?" in err


def test_recboles_config_files_spelling_is_read(tiny_data_path, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("hidden_size: 24\n")
    outputs = tmp_path / "out"
    args = cli_args(tiny_data_path, outputs, "--epochs=1", f"--config_files={config}")
    train_main([a for a in args if not a.startswith("--hidden_size=")])  # the file's, then
    (ckpt,) = (outputs / "saved").glob("*.pth")
    assert torch.load(ckpt, weights_only=True)["state_dict"]["item_embedding.weight"].shape[1] == 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of one tiny epoch, and the data it was trained on."""
    root = tmp_path_factory.mktemp("trained")
    write_inter(root / "data" / "tiny" / "tiny.inter")
    train_main(cli_args(root / "data", root / "out", "--epochs=1"))
    (ckpt,) = (root / "out" / "saved").glob("*.pth")
    return ckpt, root / "data"


def renumbered(tmp_path) -> Path:
    """The fixture's interactions with the lines in another order: the same items and users,
    numbered otherwise (RecBole numbers them by first appearance)."""
    return dataset_with(tmp_path, lambda lines: lines[:1] + lines[:0:-1])


def test_bad_checkpoints(trained, tmp_path, capsys):
    ckpt, _ = trained
    text, empty, foreign = tmp_path / "t.pth", tmp_path / "e.pth", tmp_path / "f.pth"
    text.write_text("hello, world\n")
    empty.write_bytes(b"")
    torch.save({"state_dict": {}}, foreign)
    cases = [
        ([f"--checkpoint={tmp_path / 'missing.pth'}"], "checkpoint not found"),
        ([f"--checkpoint={text}"], "is not a checkpoint: it is not a file written by torch.save"),
        ([f"--checkpoint={empty}"], "is empty: not a checkpoint"),
        ([f"--checkpoint={foreign}"], "is not a checkpoint of this project"),
        ([f"--checkpoint={ckpt}", f"--data_path={renumbered(tmp_path)}"],
         "was trained on other data than dataset 'tiny': the items are numbered otherwise "
         "(item id 1 is"),
        ([f"--checkpoint={ckpt}", "--hidden_size=32"],
         "does not match the model (settings changed since it: hidden_size 16 -> 32)"),
        ([f"--checkpoint={ckpt}", "--hiden_size=32"], "did you mean hidden_size?"),
    ]
    for argv, message in cases:
        assert message in run_and_fail(evaluate_main, argv, capsys), argv


def test_resume_refuses_other_data(trained, tmp_path, capsys):
    ckpt, _ = trained
    outputs = tmp_path / "out"
    err = run_and_fail(train_main, cli_args(renumbered(tmp_path), outputs, "--epochs=2",
                                            f"--checkpoint_path={ckpt}"), capsys)
    assert "was trained on other data than dataset 'tiny'" in err
    assert written_files(outputs) == []


OUTPUT_CASES = [
    ("checkpoint_dir", "file", "cannot be a folder: {path} is a file"),
    ("checkpoint_dir", "read-only", "is not writable: cannot create files in /proc"),
    ("log_dir", "file", "cannot be a folder"),
    ("tensorboard_dir", "read-only", "is not writable"),
]


@pytest.mark.parametrize("key,kind,message", OUTPUT_CASES)
def test_unusable_output_folders(key, kind, message, tiny_data_path, tmp_path, capsys):
    if kind == "file":
        path = tmp_path / "a-file"
        path.write_text("")
        target = path / "sub"
    else:  # on a read-only file system: a permission test would not stop root
        path = target = Path("/proc/no-such-folder") / "sub"
    outputs = tmp_path / "out"
    err = run_and_fail(train_main, cli_args(tiny_data_path, outputs, f"--{key}={target}"), capsys)
    assert message.format(path=path) in err
    assert written_files(outputs) == []


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from pipeline import checkpoint
state = {{"w": torch.randn(2_000_000)}}
print("saving", flush=True)
for i in range(1000):
    checkpoint.save({path!r}, {{"i": i, **state}})
"""


def test_a_kill_while_saving_never_leaves_an_unreadable_checkpoint(tmp_path):
    """kill -9 at a random moment of a loop of saves, 20 times: the checkpoint is always whole,
    and the temporary file left behind is removed by the next run (its writer is gone)."""
    import random

    from pipeline import checkpoint

    path = tmp_path / "run.pth"
    rng = random.Random(0)
    for _ in range(20):
        saver = SAVER.format(root=str(ROOT), path=str(path))
        proc = subprocess.Popen([sys.executable, "-c", saver], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "saving\n"  # imported: the kill falls among the saves
        if not path.exists():  # the first round: a whole checkpoint before the kill
            deadline = time.time() + 60
            while not path.exists() and time.time() < deadline:
                time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert checkpoint.load(path)["w"].shape == (2_000_000,)
    checkpoint.remove_stale_temporaries(tmp_path, min_age_s=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pth"]


def test_sigterm_is_noted_in_the_log(tiny_data_path, tmp_path):
    outputs = tmp_path / "out"
    args = cli_args(tiny_data_path, outputs, "--epochs=200", "--stopping_step=200",
                    "--state=INFO")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    logs = []
    while time.time() < deadline and not any("epoch 1 training" in p.read_text() for p in logs):
        time.sleep(0.5)
        logs = list((outputs / "log").rglob("*.log"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err
    (log,) = logs
    assert log.read_text().rstrip().endswith("run stopped: terminated (SIGTERM)")


def test_two_resumes_of_one_checkpoint_at_once(trained, tmp_path):
    ckpt, data_path = trained
    outputs = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"),
                               *cli_args(data_path, outputs, "--epochs=2",
                                         f"--checkpoint_path={ckpt}", f"--seed={seed}")],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    written = sorted((outputs / "saved").glob("*.pth"))
    assert len(written) == 2 and ckpt not in written
    loaded = [torch.load(p, weights_only=True) for p in [ckpt, *written]]
    assert all(d["resumed_from"] == str(ckpt) for d in loaded[1:])
    weights = [d["state_dict"]["item_embedding.weight"] for d in loaded]
    assert not torch.equal(weights[1], weights[2])  # each run its own file, its own training


def test_scripts_never_print_a_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    for script, args in (("run.py", ["--hidden_size=abc"]), ("test.py", [f"--checkpoint={bad}"]),
                         ("recommend.py", [f"--checkpoint={bad}"])):
        proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2, (script, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
