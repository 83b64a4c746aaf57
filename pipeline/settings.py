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

A run resumed or evaluated from a checkpoint starts from the checkpoint's settings (``base``),
below the ``--config`` files and the overrides given with it.

Every setting is known and checked before anything is loaded: a key that no file of the run, no
RecBole default and no model defines is refused, with the nearest known key as a hint (a
``--key=value`` must be a setting of the run's model; a ``--config`` file may hold other models'
settings too, as the dataset configs hold TiM4Rec's); each value is held to the type and range its
YAML comment documents (:mod:`pipeline.schema`).

``gpu_id`` defaults to ``CUDA_VISIBLE_DEVICES`` when that is set (RecBole would otherwise reset the
variable to its own default, ``0``), else, in a distributed run, to the first ``LOCAL_WORLD_SIZE``
GPUs: local rank r trains on the r-th of them.

Relative ``data_path``, ``checkpoint_dir``, ``log_dir`` and ``tensorboard_dir`` are resolved against
the repository root, so ``cd baseline/X && python run.py`` finds the same data and writes to the
same folders as a run from the root.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import lru_cache
from pathlib import Path

import yaml

from pipeline import ROOT, schema
from pipeline.errors import UserError
from pipeline.registry import BASELINE_DIR, ModelSpec, find_model

CONFIG_DIR = ROOT / "config"
OVERALL = CONFIG_DIR / "overall.yaml"
DEFAULT_DATASET_CONFIG = CONFIG_DIR / "config4ml100k_64d.yaml"
DEFAULT_MODEL = "TiM4Rec"
ROOT_RELATIVE_KEYS = ("data_path", "checkpoint_dir", "log_dir", "tensorboard_dir")
# Settings RecBole reads without declaring a default for them.
RECBOLE_UNDECLARED = ("encoding",)
# Settings that say where a run ran and what it showed, not what it computed: folders, device,
# logging, data-loading workers. Comparing a run with its checkpoint and grouping runs (report.py)
# ignore them; an authors' checkpoint's are dropped (they name the authors' machine).
PLACE_KEYS = frozenset({
    "data_path", "checkpoint_dir", "checkpoint_path", "log_dir", "tensorboard_dir",
    "dataset_save_path", "dataloaders_save_path", "gpu_id", "use_gpu", "device", "worker",
    "show_progress", "state", "log_wandb", "wandb_project"})


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


def build_config(model: str | None, config_files: list[Path], overrides: dict,
                 base: dict | None = None):
    """The resolved RecBole Config and the model's spec.

    ``overrides`` hold ``--key=value`` strings or already typed values; ``base`` the settings of a
    saved run (a checkpoint's), which the files and the overrides given here change.
    """
    from pipeline import compat

    compat.apply()
    from recbole.config import Config

    # Read first: one clear line for a missing or malformed file, before RecBole reads it.
    user_files = {Path(f).resolve(): read_yaml(Path(f)) for f in config_files}
    from_files = {k: v for data in user_files.values() for k, v in data.items()}
    base = dict(base or {})
    spec = find_model(model or overrides.get("model") or from_files.get("model")
                      or base.get("model") or DEFAULT_MODEL)
    names_dataset = any("dataset" in d for d in (overrides, from_files, base))
    files = config_files_for(spec, user_files, names_dataset)
    given = {k: v for k, v in overrides.items() if k != "model"}
    config_dict = {**base, **from_files, **given} if base else dict(given)
    config_dict.pop("model", None)
    if "gpu_id" not in config_dict:
        # RecBole sets CUDA_VISIBLE_DEVICES to gpu_id (default "0"), hiding the GPUs a user or a
        # launcher picked through the variable, and the GPUs of a distributed run's other ranks.
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            config_dict["gpu_id"] = os.environ["CUDA_VISIBLE_DEVICES"]
        elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            config_dict["gpu_id"] = ",".join(map(str, range(int(os.environ["LOCAL_WORLD_SIZE"]))))
    with _argv_hidden():
        try:
            config = Config(model=spec.model_class, config_file_list=[str(f) for f in files],
                            config_dict=config_dict)
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(f"invalid configuration: {error}") from None
    _check_keys(config, spec, user_files, given)
    _check_values(config, files)
    check_valid_metric(config)
    for key in ROOT_RELATIVE_KEYS:
        value = config[key]
        if value is not None and not Path(value).is_absolute():
            config[key] = str(ROOT / value)
    return config, spec


def _project_yaml_files() -> list[Path]:
    return sorted([*CONFIG_DIR.glob("*.yaml"), *(CONFIG_DIR / "model").glob("*.yaml"),
                   *BASELINE_DIR.glob("*/config.yaml")])


def _check_keys(config, spec: ModelSpec, user_files: dict, given: dict) -> None:
    """UserError for a key that is no setting: of the run's model (``given``), or of any model of
    the project (a ``--config`` file, which may serve several models, as the dataset configs do)."""
    of_run = {*config.internal_config_dict, *RECBOLE_UNDECLARED, "model", "dataset"}
    for path in (OVERALL, spec.defaults, spec.settings):
        of_run |= schema.keys_of(path) if path is not None else set()
    anywhere = of_run.union(*(schema.keys_of(p) for p in _project_yaml_files()))
    for key in given:
        if key in of_run:
            continue
        if key in anywhere:
            raise UserError(f"'{key}' is not a setting of {spec.name}")
        raise UserError(schema.unknown_key(key, of_run))
    for path, data in user_files.items():
        for key in data:
            if key not in anywhere:
                raise UserError(f"config file {path}: {schema.unknown_key(key, anywhere)}")


def _check_values(config, files) -> None:
    """UserError for a value outside the type and range its YAML comment documents."""
    for key, setting in schema.schema_for(files).items():
        if key in config.final_config_dict:
            problem = setting.problem(config[key])
            if problem:
                raise UserError(f"{key} {problem}, got {config[key]!r}")


def check_valid_metric(config) -> None:
    """UserError unless ``valid_metric`` (e.g. NDCG@10) is among the metrics
    and cut-offs computed."""
    name, _, cutoff = str(config["valid_metric"]).lower().partition("@")
    metrics = [str(m).lower() for m in config["metrics"]]
    topk = config["topk"] if isinstance(config["topk"], list) else [config["topk"]]
    if name not in metrics or (cutoff and (not cutoff.isdigit() or int(cutoff) not in topk)):
        raise UserError(f"valid_metric {config['valid_metric']} is not computed: metrics are "
                        f"{config['metrics']} at topk {topk}")


def check_dataset_files(config) -> None:
    """UserError when the dataset's atomic .inter file is missing or its header malformed, or a
    column the run needs is missing.

    (RecBole would otherwise try to download a dataset it does not find, and fail deep inside the
    split on a missing time column.)
    """
    from pipeline.atomic import read_header

    folder = Path(config["data_path"])
    inter = folder / f"{config['dataset']}.inter"
    name = config["dataset"]
    if not folder.is_dir():
        raise UserError(f"dataset '{name}' not found: no folder {folder} "
                        f"(prepare it with dataset/prepare.py, or set data_path)")
    if not inter.is_file():
        raise UserError(f"dataset '{name}': no atomic file {inter.name} in {folder}")
    header = [column for column, _ in read_header(inter, config["field_separator"],
                                                  config["encoding"])]
    loaded = (config["load_col"] or {}).get("inter") if config["load_col"] else None
    needed = {config["USER_ID_FIELD"]: "the user column",
              config["ITEM_ID_FIELD"]: "the item column"}
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
