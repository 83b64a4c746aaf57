"""The training pipeline end to end on a tiny dataset: train, checkpoints, resume, evaluate."""

import math
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint, precompile
from pipeline.errors import UserError
from pipeline.settings import build_config
from pipeline.workflow import evaluate, train


@pytest.fixture()
def tiny(tiny_data_path, tmp_path):
    """Overrides that train a small TiM4Rec on the tiny dataset, writing under tmp_path."""
    return {
        "dataset": "tiny", "data_path": str(tiny_data_path), "epochs": 2,
        "MAX_ITEM_LIST_LENGTH": 10, "hidden_size": 16, "d_state": 8, "head_dim": 8, "chunk_size": 4,
        "train_batch_size": 64, "eval_batch_size": 128, "show_progress": False, "use_gpu": False,
        "topk": [5, 10],
        "checkpoint_dir": str(tmp_path / "saved"), "log_dir": str(tmp_path / "log"),
        "tensorboard_dir": str(tmp_path / "tb"),
    }


def test_train_writes_checkpoint_log_and_tensorboard(tiny, tmp_path):
    result = train(overrides=tiny, quiet=True)
    ckpt = torch.load(result["checkpoint"], weights_only=True)  # plain data, no pickled objects
    assert ckpt["format"] == "tim4rec-checkpoint" and ckpt["model"] == "TiM4Rec"
    assert ckpt["config"]["dataset"] == "tiny" and ckpt["config"]["hidden_size"] == 16
    assert set(result["test_result"]) == {f"{m}@{k}" for m in ("hit", "ndcg", "mrr")
                                          for k in (5, 10)}
    assert all(0 <= v <= 1 for v in result["test_result"].values())
    assert ckpt["best_valid_result"] == result["best_valid_result"]
    log = (tmp_path / "log" / "TiM4Rec" / f"{result['run']}.log").read_text()
    for needed in ("torch:", "recbole:", "mamba-ssm:", "device: cpu", "SSD backend: torch",
                   "hidden_size"):
        assert needed in log, needed
    assert "\x1b[" not in log  # RecBole's colours stay on the console
    assert any((tmp_path / "tb" / result["run"]).iterdir())


def test_evaluate_reproduces_the_test_metrics(tiny):
    result = train(overrides=tiny, quiet=True)
    again = evaluate(result["checkpoint"], quiet=True)
    assert again["model"] == "TiM4Rec" and again["dataset"] == "tiny"
    for key, value in result["test_result"].items():
        assert math.isclose(again["test_result"][key], value, abs_tol=1e-6), key


def test_runs_started_together_never_share_a_checkpoint(tiny):
    first = train(overrides=dict(tiny, epochs=1), quiet=True)
    second = train(overrides=dict(tiny, epochs=1, seed=7), quiet=True)
    assert first["checkpoint"] != second["checkpoint"]
    a, b = (torch.load(r["checkpoint"], weights_only=True)["state_dict"] for r in (first, second))
    assert not torch.equal(a["item_embedding.weight"], b["item_embedding.weight"])


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_resume_is_a_new_run_with_the_settings_given(tiny):
    """A resumed run writes a checkpoint of its own, leaves its source untouched, and trains with
    the learning rate and weight decay it is given (not the ones in the optimizer's saved state)."""
    first = train(overrides=dict(tiny, epochs=1, stopping_step=100), quiet=True)
    source = first["checkpoint"]
    before = sha256(source)
    saved = torch.load(source, weights_only=True)
    assert saved["epoch"] == 0 and saved["optimizer"]["state"]  # Adam moments travel along

    resumed = train(overrides=dict(tiny, epochs=3, stopping_step=100, checkpoint_path=source,
                                   learning_rate=0.05, weight_decay=0.1), quiet=True)
    assert resumed["checkpoint"] != source and sha256(source) == before
    after = torch.load(resumed["checkpoint"], weights_only=True)
    assert after["resumed_from"] == source and resumed["resumed_from"] == source
    assert ({(g["lr"], g["weight_decay"]) for g in after["optimizer"]["param_groups"]}
            == {(0.05, 0.1)})
    assert after["config"]["learning_rate"] == 0.05
    log = Path(resumed["log"]).read_text()
    assert "learning_rate 0.001 -> 0.05" in log and "weight_decay 0.0 -> 0.1" in log
    assert "from its best epoch (0): training from epoch 1" in log
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert after["best_valid_score"] >= saved["best_valid_score"]


def scripted_validation(monkeypatch, scores):
    """Validation scores by epoch, as given (the model's real ones are replaced)."""
    from pipeline.trainer import ProjectTrainer

    original = ProjectTrainer._valid_epoch

    def valid_epoch(self, valid_data, show_progress=False):
        _, result = original(self, valid_data, show_progress)
        return scores[len(self.history) - 1], result

    monkeypatch.setattr(ProjectTrainer, "_valid_epoch", valid_epoch)


def test_the_last_state_is_kept_beside_the_best_and_resumed(tiny, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.4, 0.3, 0.9])
    first = train(overrides=dict(tiny, epochs=3, stopping_step=100), quiet=True)
    saved = torch.load(first["checkpoint"], weights_only=True)
    assert saved["epoch"] == 0 and saved["last"]["epoch"] == 2 and first["best_epoch"] == 0
    assert saved["last"]["cur_step"] == 2
    assert not torch.equal(saved["state_dict"]["item_embedding.weight"],
                           saved["last"]["state_dict"]["item_embedding.weight"])

    monkeypatch.undo()
    resumed = train(overrides=dict(tiny, epochs=4, stopping_step=100,
                                   checkpoint_path=first["checkpoint"]), quiet=True)
    assert [e["epoch"] for e in resumed["epochs"]] == [3]
    assert "from its last epoch (2): training from epoch 3" in Path(resumed["log"]).read_text()


def test_an_interrupted_run_keeps_its_last_validated_state(tiny, monkeypatch):
    from pipeline.trainer import ProjectTrainer

    scripted_validation(monkeypatch, [0.5, 0.4])
    original = ProjectTrainer._train_epoch

    def train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == 2:
            raise KeyboardInterrupt
        return original(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(ProjectTrainer, "_train_epoch", train_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(overrides=dict(tiny, epochs=5, stopping_step=100), quiet=True)
    (path,) = Path(tiny["checkpoint_dir"]).glob("*.pth")
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 0 and saved["last"]["epoch"] == 1
    (log,) = Path(tiny["log_dir"]).rglob("*.log")
    assert log.read_text().rstrip().endswith("run stopped: interrupted (Ctrl-C)")


def test_nothing_is_written_before_the_first_epoch_ends(tiny, monkeypatch):
    from pipeline.trainer import ProjectTrainer

    def train_epoch(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ProjectTrainer, "_train_epoch", train_epoch)
    with pytest.raises(RuntimeError):
        train(overrides=tiny, quiet=True)
    written = [p for key in ("checkpoint_dir", "log_dir", "tensorboard_dir")
               for p in Path(tiny[key]).rglob("*") if p.is_file()]
    assert written == []


def test_resume_refuses_another_shape_naming_the_setting(tiny):
    first = train(overrides=dict(tiny, epochs=1), quiet=True)
    with pytest.raises(UserError, match=r"settings changed since it: .*hidden_size 16 -> 32"):
        train(overrides=dict(tiny, epochs=2, hidden_size=32, checkpoint_path=first["checkpoint"]),
              quiet=True)


def test_changed_settings_name_the_models_settings_not_where_it_ran(tiny, tmp_path):
    """A checkpoint's settings against a run's: folders, device, workers and progress bars are
    where a run ran (settings.PLACE_KEYS), not what it computes; every other change is named."""
    from pipeline.settings import PLACE_KEYS, plain_config
    from pipeline.workflow import changed_settings

    config, _ = build_config("TiM4Rec", [], dict(tiny))
    saved = dict(plain_config(config), data_path=str(tmp_path), gpu_id="3", use_gpu=True,
                 worker=4, show_progress=True, checkpoint_dir=str(tmp_path))
    assert changed_settings(saved, config) == ""
    saved.update(hidden_size=32, seed=7)
    assert changed_settings(saved, config) == (
        f"hidden_size 32 -> {config['hidden_size']!r}, seed 7 -> {config['seed']!r}")
    assert {"hidden_size", "seed", "dataset", "MAX_ITEM_LIST_LENGTH"}.isdisjoint(PLACE_KEYS)


def test_resume_refuses_another_models_checkpoint(tiny):
    first = train(overrides=dict(tiny, epochs=1), quiet=True)
    with pytest.raises(UserError, match="holds a TiM4Rec model"):
        train(model="GRU4Rec", overrides=dict(tiny, checkpoint_path=first["checkpoint"]),
              quiet=True)


def test_authors_recbole_checkpoint_needs_explicit_opt_in(tiny, tmp_path):
    """A RecBole-style checkpoint (pickled Config) loads only with allow_pickle."""
    result = train(overrides=dict(tiny, epochs=1), quiet=True)
    ours = torch.load(result["checkpoint"], weights_only=True)
    config, _ = build_config("TiM4Rec", [], dict(tiny))
    path = tmp_path / "TiM4Rec-Sep-19-2024_12-59-06.pth"
    torch.save({"config": config, "epoch": 0, "cur_step": 0, "best_valid_score": 0.1,
                "state_dict": ours["state_dict"], "other_parameter": None,
                "optimizer": ours["optimizer"]}, path)
    with pytest.raises(UserError, match="--allow-pickle"):
        evaluate(path, quiet=True)
    theirs = evaluate(path, allow_pickle=True, overrides={"data_path": tiny["data_path"]},
                                 quiet=True)
    for key, value in result["test_result"].items():
        assert math.isclose(theirs["test_result"][key], value, abs_tol=1e-6), key


def test_checkpoint_loader_rejects_other_files(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        checkpoint.load(path)
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "missing.pth")


def test_every_shipped_config_builds(tiny):
    """The five upstream configs and the default resolve, with the values of reference section 2."""
    from pipeline.settings import CONFIG_DIR

    expected = {  # file: (dataset, hidden, is_time, L, batch, lr, norm_eps)
        "config4beauty_64d.yaml": ("amazon-beauty", 64, True, 50, 2048, 1e-3, 1e-5),
        "config4kuai_64d.yaml": ("kuairand", 64, False, 50, 2048, 1e-3, 1e-10),
        "config4movie_64d.yaml": ("ml-1m", 64, True, 200, 2048, 1e-3, 1e-12),
        "config4movie_256d.yaml": ("ml-1m", 256, False, 200, 512, 1e-3, 1e-12),
        "config4steam_64d.yaml": ("steam", 64, True, 50, 2048, 5e-4, 1e-10),
        "config4ml100k_64d.yaml": ("ml-100k", 64, True, 50, 2048, 1e-3, 1e-12),
    }
    for name, (dataset, hidden, is_time, length, batch, lr, eps) in expected.items():
        config, spec = build_config(None, [CONFIG_DIR / name], {"use_gpu": False})
        got = (config["dataset"], config["hidden_size"], config["is_time"],
               config["MAX_ITEM_LIST_LENGTH"], config["train_batch_size"], config["learning_rate"],
               config["norm_eps"])
        assert spec.name == "TiM4Rec" and got == (dataset, hidden, is_time, length, batch, lr, eps)
        assert config["valid_metric"] == "NDCG@10"
        assert config["train_neg_sample_args"]["distribution"] == "none"  # CE over all items


def test_a_config_file_can_name_the_model(tmp_path):
    from pipeline.settings import CONFIG_DIR

    config_file = tmp_path / "gru.yaml"
    config_file.write_text("model: GRU4Rec\nhidden_size: 32\n")
    files = [CONFIG_DIR / "config4ml100k_64d.yaml", config_file]  # dataset config: dropout_prob 0.2
    config, spec = build_config(None, files, {"use_gpu": False})
    assert spec.name == "GRU4Rec" and config["model"] == "GRU4Rec"
    assert config["hidden_size"] == 32  # a file naming the model wins over its settings (128)...
    assert config["dropout_prob"] == 0.4  # ...which win over the dataset config's TiM4Rec values
    config, spec = build_config("SASRec", files, {"use_gpu": False})  # --model wins
    assert spec.name == "SASRec"


def test_cuda_visible_devices_is_kept_unless_gpu_id_is_given(monkeypatch):
    import os

    from pipeline.settings import CONFIG_DIR

    files = [CONFIG_DIR / "config4ml100k_64d.yaml"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    config, _ = build_config(None, files, {"use_gpu": False})
    assert config["gpu_id"] == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    config, _ = build_config(None, files, {"use_gpu": False, "gpu_id": "1"})
    assert config["gpu_id"] == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_sasrec_through_the_pipeline_equals_recboles_own_run(tiny, tmp_path, monkeypatch):
    """The protocol control: with the same files and settings, RecBole's own flow (run_recbole's
    steps; run_recbole itself imports ray) and RecBole's Trainer give the same metrics."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import get_model, init_seed

    from pipeline.registry import find_model
    from pipeline.settings import OVERALL

    settings = {**{k: v for k, v in tiny.items()
                   if k not in ("hidden_size", "d_state", "head_dim", "chunk_size")},
                "hidden_size": 16}
    ours = train(model="SASRec", overrides=settings, quiet=True)

    monkeypatch.chdir(tmp_path)  # RecBole's Trainer opens ./log_tensorboard
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # it reloads a pickled checkpoint
    files = [str(OVERALL), str(find_model("SASRec").settings)]
    config = Config(model="SASRec", config_file_list=files,
                    config_dict={**settings, "checkpoint_dir": str(tmp_path / "recbole-saved")})
    init_seed(config["seed"], config["reproducibility"])
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("SASRec")(config, train_data._dataset)
    trainer = Trainer(config, model)
    best_valid_score, _ = trainer.fit(train_data, valid_data, saved=True)
    theirs = trainer.evaluate(test_data, load_best_model=True)

    assert ours["test_result"].keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours["test_result"][key] == pytest.approx(float(value), abs=1e-4), key
    assert ours["best_valid_score"] == pytest.approx(float(best_valid_score), abs=1e-4)


def test_kernels_are_compiled_ahead_once_before_training_and_before_an_evaluation(
        tiny, tmp_path, monkeypatch):
    """The trainer's wiring of pipeline/precompile.py (whose dry pass needs a GPU): once, at the
    first batch, for the training step; once before the first evaluation of a run that only
    evaluates; never with compile_ahead False; a failure is a warning, not the end of the run."""
    calls = []

    def compile_step(model, interaction, amp=False, workers=None, train=True, train_inside=None):
        assert train_inside is None  # no captured step here, and so no packed shapes for it
        calls.append((train, type(interaction).__name__))
        return {"kernels": 3, "failed": 0, "dry_s": 0.0, "compile_s": 0.0}

    monkeypatch.setattr(precompile, "wanted", lambda device, setting: bool(setting))
    monkeypatch.setattr(precompile, "compile_step", compile_step)
    result = train(overrides=tiny, quiet=True)  # two epochs, with validation
    assert calls == [(True, "Interaction")]
    calls.clear()
    evaluate(result["checkpoint"], quiet=True)
    assert calls == [(False, "Interaction")]
    calls.clear()
    train(overrides=dict(tiny, epochs=1, compile_ahead=False), quiet=True)
    assert calls == []

    def broken(*args, **kwargs):
        raise RuntimeError("no hooks here")

    monkeypatch.setattr(precompile, "compile_step", broken)
    again = train(overrides=dict(tiny, epochs=1), quiet=True)
    log = (tmp_path / "log" / "TiM4Rec" / f"{again['run']}.log").read_text()
    assert "not compiled ahead (RuntimeError: no hooks here)" in log
    assert again["test_result"]
