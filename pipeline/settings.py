"""Build a RecBole Config from the project's YAML files and ``--key=value`` overrides.

Priority, lowest first (a later source overrides an earlier one):

1. RecBole's own defaults, then ``config/overall.yaml`` (the evaluation protocol of the paper);
2. the model's defaults (``config/model/TiM4Rec.yaml``); the model is ``--model``, else a ``model``
   key of the ``--config`` files, else TiM4Rec;
3. the ``--config`` files in the order given; when none of them names a ``dataset``, the default
   ``config/config4ml100k_64d.yaml`` comes first;
4. a baseline's settings (``baseline/<Name>/config.yaml``): its hyperparameters win over the
   TiM4Rec hyperparameters that the dataset configs carry;
5. ``--config`` files that name the ``model``: they are written for it, so they win over its
   settings;
6. ``--key=value`` overrides.

``gpu_id`` defaults to ``CUDA_VISIBLE_DEVICES`` when that is set (RecBole would otherwise reset the
variable to its own default, ``0``), else, in a distributed run, to the first ``LOCAL_WORLD_SIZE``
GPUs: local rank r trains on the r-th of them.

Relative ``data_path``, ``checkpoint_dir``, ``log_dir`` and ``tensorboard_dir`` are resolved against the
repository root, so ``cd baseline/X && python run.py`` finds the same data and writes to the same
folders as a run from the root.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import lru_cache
from pathlib import Path

import yaml

from pipeline import ROOT
from pipeline.errors import UserError
from pipeline.registry import ModelSpec, find_model

CONFIG_DIR = ROOT / "config"
OVERALL = CONFIG_DIR / "overall.yaml"
DEFAULT_DATASET_CONFIG = CONFIG_DIR / "config4ml100k_64d.yaml"
DEFAULT_MODEL = "TiM4Rec"
ROOT_RELATIVE_KEYS = ("data_path", "checkpoint_dir", "log_dir", "tensorboard_dir")


@lru_cache(maxsize=None)
def _yaml_loader():
    from recbole.config import Config

    return Config._build_yaml_loader(None)  # RecBole's: reads 1e-5 as a float, as YAML 1.1 does not


def read_yaml(path: Path) -> dict:
    """A config file as a dict, read as RecBole reads it; UserError if missing or malformed."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold 'key: value' lines")
    return data


@contextlib.contextmanager
def _argv_hidden():
    # RecBole's Config parses sys.argv on its own; the project's CLI has already parsed it.
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def config_files_for(spec: ModelSpec, user_files: dict[Path, dict],
                     names_dataset: bool) -> list[Path]:
    """The YAML files of a run, lowest priority first (see the module docstring).

    ``user_files`` maps each ``--config`` file, in order, to its contents.
    """
    files = [OVERALL]
    if spec.defaults is not None:
        files.append(spec.defaults)
    if not names_dataset:
        files.append(DEFAULT_DATASET_CONFIG)
    files += [f for f, data in user_files.items() if "model" not in data and f != spec.settings]
    if spec.settings is not None:
        files.append(spec.settings)
    files += [f for f, data in user_files.items() if "model" in data and f != spec.settings]
    return files


def build_config(model: str | None, config_files: list[Path], overrides: dict):
    """The resolved RecBole Config and the model's spec.

    ``overrides`` hold ``--key=value`` strings or already typed values (from a checkpoint).
    """
    from pipeline import compat

    compat.apply()
    from recbole.config import Config

    # Read first: one clear line for a missing or malformed file, before RecBole reads it.
    user_files = {Path(f).resolve(): read_yaml(Path(f)) for f in config_files}
    from_files = {k: v for data in user_files.values() for k, v in data.items()}
    spec = find_model(model or overrides.get("model") or from_files.get("model") or DEFAULT_MODEL)
    files = config_files_for(spec, user_files, "dataset" in overrides or "dataset" in from_files)
    overrides = {k: v for k, v in overrides.items() if k != "model"}
    if "gpu_id" not in overrides:
        # RecBole sets CUDA_VISIBLE_DEVICES to gpu_id (default "0"), hiding the GPUs a user or a
        # launcher picked through the variable, and the GPUs of a distributed run's other ranks.
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            overrides["gpu_id"] = os.environ["CUDA_VISIBLE_DEVICES"]
        elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            overrides["gpu_id"] = ",".join(map(str, range(int(os.environ["LOCAL_WORLD_SIZE"]))))
    with _argv_hidden():
        try:
            config = Config(model=spec.model_class, config_file_list=[str(f) for f in files],
                            config_dict=overrides)
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(f"invalid configuration: {error}") from None
    check_valid_metric(config)
    if config["cuda_graph"] not in (True, False, "auto"):
        raise UserError(f"cuda_graph must be auto, True or False, got {config['cuda_graph']!r}")
    if config["compile_ahead"] not in (True, False):
        raise UserError(f"compile_ahead must be True or False, got {config['compile_ahead']!r}")
    for key in ROOT_RELATIVE_KEYS:
        value = config[key]
        if value is not None and not Path(value).is_absolute():
            config[key] = str(ROOT / value)
    return config, spec


def check_valid_metric(config) -> None:
    """UserError unless ``valid_metric`` (e.g. NDCG@10) is among the metrics and cut-offs computed."""
    name, _, cutoff = str(config["valid_metric"]).lower().partition("@")
    metrics = [str(m).lower() for m in config["metrics"]]
    topk = config["topk"] if isinstance(config["topk"], list) else [config["topk"]]
    if name not in metrics or (cutoff and (not cutoff.isdigit() or int(cutoff) not in topk)):
        raise UserError(f"valid_metric {config['valid_metric']} is not computed: metrics are "
                        f"{config['metrics']} at topk {topk}")


def check_dataset_files(config) -> None:
    """UserError when the dataset's atomic .inter file, or a column the run needs, is missing.

    (RecBole would otherwise try to download a dataset it does not find, and fail deep inside the
    split on a missing time column.)
    """
    folder = Path(config["data_path"])
    inter = folder / f"{config['dataset']}.inter"
    name = config["dataset"]
    if not folder.is_dir():
        raise UserError(f"dataset '{name}' not found: no folder {folder} "
                        f"(prepare it with dataset/prepare.py, or set data_path)")
    if not inter.is_file():
        raise UserError(f"dataset '{name}': no atomic file {inter.name} in {folder}")
    with inter.open(encoding="utf-8") as f:
        header = [field.split(":")[0] for field in f.readline().rstrip("\n").split("\t")]
    loaded = (config["load_col"] or {}).get("inter") if config["load_col"] else None
    needed = {config["USER_ID_FIELD"]: "the user column", config["ITEM_ID_FIELD"]: "the item column"}
    if config["eval_args"]["order"] == "TO":
        needed[config["TIME_FIELD"]] = "ordering by time (eval_args order: TO)"
    if config["is_time"]:
        needed[config["TIME_FIELD"]] = "is_time"
    for column, why in needed.items():
        if column not in header:
            raise UserError(f"dataset '{name}': {inter} has no column '{column}', needed by {why}")
        if loaded is not None and column not in loaded:
            raise UserError(f"dataset '{name}': column '{column}' is needed by {why}: add it to "
                            f"load_col (inter)")


def plain_config(config) -> dict:
    """The run's settings as plain data (for checkpoints): what the files and overrides set.

    Derived values (device, joined data_path, enums) are left out: RecBole recomputes them.
    """
    external = dict(config.external_config_dict)
    external["model"] = config["model"]
    external["dataset"] = config["dataset"]
    return _plain(external)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
