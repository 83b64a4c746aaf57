"""The README's "Add a model" and "Add a dataset", followed as written: its toy model added to a
copy of the repository and run through every entry point, and toy datasets trained one epoch."""

import shutil
import subprocess
import sys

import pytest
import torch

from pipeline import ROOT
from pipeline.cli import train_main
from tests.conftest import TIM4REC_SIZES, write_inter
from tests.test_cli import TINY_MODEL, cli_args, run_and_fail
from tests.test_recbole_flow import run_readme_script, tiny_settings


def readme_section(title: str) -> str:
    return (ROOT / "README.md").read_text().split(f"\n## {title}\n")[1].split("\n## ")[0]


def code_block(section: str, language: str) -> str:
    return section.split(f"```{language}\n")[1].split("```")[0]


@pytest.fixture(scope="module")
def repo_with_meanrec(tmp_path_factory):
    """A copy of the repository's code with the README's MeanRec in ``baseline/MeanRec/``."""
    repo = tmp_path_factory.mktemp("repo")
    for folder in ("pipeline", "config", "baseline"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for script in ("run.py", "test.py", "recommend.py"):
        shutil.copy(ROOT / script, repo / script)
    section = readme_section("Add a model")
    model_dir = repo / "baseline" / "MeanRec"
    model_dir.mkdir()
    (model_dir / "model.py").write_text(code_block(section, "python"))
    (model_dir / "config.yaml").write_text(code_block(section, "yaml"))
    run_py = (ROOT / "baseline" / "LRURec" / "run.py").read_text().replace("LRURec", "MeanRec")
    (model_dir / "run.py").write_text(run_py)
    return repo


def meanrec_args(data_path, outputs, *extra) -> list[str]:
    """A tiny one-epoch run's arguments, less the SSD sizes (MeanRec has no such setting)."""
    args = cli_args(data_path, outputs, "--epochs=1", *extra)
    return [a for a in args if a.split("=")[0].lstrip("-") not in TIM4REC_SIZES]


def run_script(repo, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *map(str, args)], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_an_added_model_trains_evaluates_recommends_and_runs_in_recboles_flow(
        repo_with_meanrec, tiny_data_path, tmp_path):
    repo, outputs = repo_with_meanrec, tmp_path / "out"
    run_script(repo, "run.py", "--model=MeanRec", *meanrec_args(tiny_data_path, outputs))
    [checkpoint] = (outputs / "saved").glob("MeanRec-tiny-*.pth")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["model"] == "MeanRec" and saved["config"]["hidden_size"] == 16

    evaluated = run_script(repo, "test.py", f"--checkpoint={checkpoint}")
    assert "MeanRec on tiny" in evaluated.stdout and "| ndcg |" in evaluated.stdout
    recommended = run_script(repo, "recommend.py", f"--checkpoint={checkpoint}", "--users=1",
                             "--k=3")
    assert len(recommended.stdout.strip().splitlines()) == 1 + 3  # the header, then 3 items

    flow = tmp_path / "flow"
    flow.mkdir()
    run_readme_script("MeanRec", "from baseline.MeanRec.model import MeanRec",
                      tiny_settings(tiny_data_path), flow, root=repo)


def test_an_added_model_checks_its_documented_settings(repo_with_meanrec, tiny_data_path,
                                                       tmp_path):
    args = meanrec_args(tiny_data_path, tmp_path / "out", "--loss_type=BPR")
    done = subprocess.run([sys.executable, "run.py", "--model=meanrec", *args],
                          cwd=repo_with_meanrec, capture_output=True, text=True, timeout=600)
    assert (done.returncode, done.stderr) == (2, "error: loss_type must be one of CE, got 'BPR'\n")


HEADER = "user_id:token\titem_id:token\ttimestamp:float"


def write_dataset(data_path, name: str, header: str = HEADER, mend=lambda lines: lines):
    """``data_path/name/name.inter`` as the README writes it: the tiny rows under ``header``."""
    path = data_path / name / f"{name}.inter"
    write_inter(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(mend([header, *lines[1:]])) + "\n")
    return path


def test_a_dataset_named_on_the_command_line_trains(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, "toyshop")
    outputs = tmp_path / "out"
    train_main(cli_args(data, outputs, "--dataset=toyshop", "--epochs=1"))
    assert len(list((outputs / "saved").glob("TiM4Rec-toyshop-*.pth"))) == 1


def test_a_dataset_config_file_with_other_column_names_trains(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, "toyshop", "customer:token\tproduct:token\tbought_at:float")
    config = tmp_path / "config4toyshop_64d.yaml"
    config.write_text(f"dataset: toyshop\ndata_path: {data}\nUSER_ID_FIELD: customer\n"
                      f"ITEM_ID_FIELD: product\nTIME_FIELD: bought_at\n"
                      f"load_col: {{inter: [customer, product, bought_at]}}\n")
    outputs = tmp_path / "out"
    train_main([f"--config={config}", *TINY_MODEL, "--epochs=1",
                f"--checkpoint_dir={outputs / 'saved'}", f"--log_dir={outputs / 'log'}",
                f"--tensorboard_dir={outputs / 'tb'}"])
    assert len(list((outputs / "saved").glob("TiM4Rec-toyshop-*.pth"))) == 1


@pytest.mark.parametrize("header, mend, message", [
    ("user_id\titem_id:token\ttimestamp:float", None, "header column 'user_id' has no type"),
    (HEADER.replace("\t", ","), None, "the header is separated by commas"),
    (HEADER, lambda lines: [*lines[:3], "1\t2\t", *lines[3:]],
     "line 4 has no value for timestamp"),
    (HEADER, lambda lines: lines[:4], "the filters left no interactions"),
], ids=["untyped", "commas", "missing-time", "filtered-empty"])
def test_a_dataset_is_refused_in_one_line(tmp_path, capsys, header, mend, message):
    data = tmp_path / "data"
    write_dataset(data, "toyshop", header, mend or (lambda lines: lines))
    err = run_and_fail(train_main, cli_args(data, tmp_path / "out", "--dataset=toyshop"), capsys)
    assert message in err, err
