"""The project's models in RecBole's own flow: the README's script, run as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import ROOT

MODELS = {"TiM4Rec": "from tim4rec import TiM4Rec",
          "LRURec": "from baseline.LRURec.model import LRURec",
          "Mamba4Rec": "from baseline.Mamba4Rec.model import Mamba4Rec",
          "SSD4Rec": "from baseline.SSD4Rec.model import SSD4Rec",
          "TiSASRec": "from baseline.TiSASRec.model import TiSASRec"}


def readme_script() -> str:
    section = (ROOT / "README.md").read_text().split("**RecBole's own flow.**")[1]
    return section.split("```python")[1].split("```")[0]


def tiny_settings(data_path) -> dict:
    """The settings a script changes: the data (tiny), the size and the epochs."""
    return {"dataset": "tiny", "data_path": str(data_path), "epochs": 1, "use_gpu": False,
            "MAX_ITEM_LIST_LENGTH": 10, "hidden_size": 16, "show_progress": False,
            "train_batch_size": 64, "eval_batch_size": 64}


def run_readme_script(model: str, import_line: str, settings: dict, cwd: Path,
                      root: Path = ROOT) -> None:
    """The README's script for ``model`` (imported by ``import_line``) with ``settings`` as its
    config_dict, run in ``cwd`` on the repository at ``root``: it trains, tests and saves."""
    script = readme_script()
    assert 'Config(model=TiM4Rec, config_file_list=["config/config4ml100k_64d.yaml"])' in script
    script = script.replace(
        'config_file_list=["config/config4ml100k_64d.yaml"])',
        f'config_file_list=[{str(root / "config" / "config4ml100k_64d.yaml")!r}], '
        f'config_dict={settings!r})')
    script = script.replace("from tim4rec import TiM4Rec", import_line).replace("TiM4Rec", model)
    script = f"import sys\nsys.path.insert(0, {str(root)!r})\n" + script
    # in a folder of its own: RecBole's Trainer writes saved/, log/ and log_tensorboard/ there
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ndcg@10" in done.stdout and "hit@10" in done.stdout, done.stdout[-2000:]
    assert list((cwd / "saved").glob(f"{model}-*.pth"))


@pytest.mark.parametrize("model", list(MODELS))
def test_recboles_trainer_trains_and_evaluates_the_model(model, tiny_data_path, tmp_path):
    """Only the data (tiny), the size and the epochs are changed from the README's script: every
    other setting of the model comes from its defaults file, through RecBole's Config."""
    small = tiny_settings(tiny_data_path)
    if model in ("TiM4Rec", "SSD4Rec"):
        small.update(d_state=8, head_dim=8, chunk_size=4)
    run_readme_script(model, MODELS[model], small, tmp_path)
