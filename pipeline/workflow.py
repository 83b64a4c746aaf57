"""What a user runs: train a model, evaluate a checkpoint, load one into its config, data and model.

These are the functions behind ``run.py`` and ``test.py`` (and, with
:mod:`pipeline.recommendations`, ``recommend.py``), and the project's Python API (``from pipeline
import train, evaluate, load, recommend``; see the README).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple

from pipeline import checkpoint, distributed, vocabulary
from pipeline.errors import UserError
from pipeline.registry import ModelSpec, find_model
from pipeline.runlog import OUTPUT_KEYS, RunLog, check_writable, environment, new_run
from pipeline.settings import PLACE_KEYS, build_config, check_dataset_files, plain_config, read_yaml

logger = logging.getLogger(__name__)


class Loaded(NamedTuple):
    """A checkpoint with what it needs to run: ``load``'s result."""

    config: object  # the RecBole Config of the saved run (with any overrides)
    model: object  # the model, with the checkpoint's best weights, in eval mode
    dataset: object  # the whole dataset (filtered, ids remapped), as RecBole builds it
    train_data: object  # RecBole's data loaders of the split
    valid_data: object
    test_data: object
    checkpoint: dict  # the checkpoint as read (pipeline.checkpoint)
    path: Path
    interactions: object  # every interaction after the filters (pandas: user, item, time ids),
    # or None where only metrics are computed (evaluate)


def seed_and_precision(config) -> None:
    """Seed every generator from ``config`` and set TF32 as ``enable_tf32`` says, as a run does
    before it loads its data."""
    import torch
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    # TF32 changes float32 matmul results; the paper's protocol keeps it off (opt-in here).
    torch.backends.cuda.matmul.allow_tf32 = bool(config["enable_tf32"])
    torch.backends.cudnn.allow_tf32 = bool(config["enable_tf32"])


def load_data(config, keep_interactions: bool = False):
    """The dataset and its three loaders; with ``keep_interactions``, also every interaction as
    the model reads it (ids, and times as float32), before RecBole turns the dataset's own rows
    into training samples."""
    from recbole.data import create_dataset, data_preparation

    check_dataset_files(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    if max(config["topk"]) >= dataset.item_num:  # full ranking cannot cut off past the item count
        raise UserError(f"topk {config['topk']} needs more items than the {dataset.item_num - 1} "
                        f"that dataset '{config['dataset']}' has after filtering")
    interactions = None
    if keep_interactions:
        columns = [c for c in (dataset.uid_field, dataset.iid_field, dataset.time_field)
                   if c in dataset.inter_feat]
        interactions = dataset.inter_feat[columns].copy()
        if dataset.time_field in interactions:
            interactions[dataset.time_field] = interactions[dataset.time_field].astype("float32")
    return (dataset, *data_preparation(config, dataset), interactions)


def build_model(spec: ModelSpec, config, dataset):
    """``spec``'s model for ``dataset`` on ``config``'s device, its weights drawn from ``config``'s
    seed; a hyperparameter the model refuses is a :class:`UserError`."""
    from recbole.utils import init_seed

    # The same initial weights however the data loaded.
    init_seed(config["seed"], config["reproducibility"])
    try:
        model = spec.model_class(config, dataset)
    except ValueError as error:  # models validate their hyperparameters at construction
        raise UserError(f"{spec.name}: {error}") from None
    return model.to(config["device"])


def _describe(config, model) -> None:
    logger.info(config)
    for key, value in environment(config["device"]).items():
        logger.info(f"{key:>12}: {value}")
    logger.info(model)  # RecBole's model repr ends with the count of trainable parameters


def format_metrics(result: dict) -> str:
    """``{'hit@10': .1, 'ndcg@10': .05, ...}`` as a table:
    one row per cut-off, one column per metric."""
    names, cutoffs = [], []
    for key in result:
        name, _, k = key.partition("@")
        names += [name] if name not in names else []
        cutoffs += [k] if k not in cutoffs else []
    header = "| @k | " + " | ".join(names) + " |"
    rows = [header, "|" + "---|" * (len(names) + 1)]
    for k in cutoffs:
        cells = [f"{result[f'{n}@{k}']:.4f}" if f"{n}@{k}" in result else "" for n in names]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def read_checkpoint(path, allow_pickle: bool = False) -> dict:
    """This project's checkpoint, or (with ``allow_pickle``) a RecBole one such as the authors'."""
    try:
        return checkpoint.load(path)
    except UserError as error:
        if allow_pickle and "unpickling" in str(error):
            return checkpoint.load_recbole_checkpoint(path)
        raise


def _saved_settings(data: dict) -> dict:
    return {k: v for k, v in data["config"].items() if k != "checkpoint_path"}


def changed_settings(saved: dict, config) -> str:
    """The settings of ``config`` that differ from the checkpoint's ``saved`` ones, as
    ``key old -> new``, comma-separated ('' when none)."""
    now = plain_config(config)
    keys = sorted((set(saved) | set(now)) - PLACE_KEYS)
    return ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys
                     if saved.get(k) != now.get(k))


def check_data(data: dict, dataset, path) -> None:
    """UserError when ``dataset`` is not the data the checkpoint ``data`` was trained on (by its
    recorded vocabularies); a warning where the checkpoint records none."""
    record = data.get("data")
    if data.get("recbole"):
        logger.warning(f"{path} is a RecBole checkpoint, which does not record its data: its "
                       f"weights follow RecBole's item numbering of the file it was trained on "
                       f"(the order of first appearance); the dataset must be that file "
                       f"(dataset/README.md, 'The authors' checkpoints')")
    elif record is None:
        logger.warning(f"{path} was written before checkpoints recorded their data: whether "
                       f"dataset '{dataset.dataset_name}' numbers its items as the training data "
                       f"did cannot be checked")
    else:
        problem = vocabulary.difference(record, vocabulary.of(dataset))
        if problem:
            raise UserError(f"checkpoint {path} was trained on other data than dataset "
                            f"'{dataset.dataset_name}': {problem}")


def _resume_source(config_files, overrides: dict):
    """The checkpoint a run resumes: ``checkpoint_path`` of the overrides, else of the last file
    that sets it (later files win, as in the run's settings)."""
    path = overrides.get("checkpoint_path")
    for config_file in reversed(list(config_files)):
        path = path or read_yaml(Path(config_file)).get("checkpoint_path")
    return Path(path).expanduser() if path else None


def run_config(config_files=(), overrides: dict | None = None, model: str | None = None):
    """A training run's Config and model spec, and the checkpoint it resumes (path and contents, or
    None): everything checked that can be before the data is read, the output folders included."""
    overrides = dict(overrides or {})
    source = _resume_source(config_files, overrides)
    resumed = checkpoint.load(source) if source is not None else None
    if resumed is not None:
        asked = model or overrides.get("model")
        if asked and find_model(asked).name.lower() != resumed["model"].lower():
            raise UserError(f"checkpoint {source} holds a {resumed['model']} model, not {asked}")
    config, spec = build_config(model, list(config_files), overrides,
                                base=_saved_settings(resumed) if resumed else None)
    if resumed is not None and resumed["model"].lower() != spec.name.lower():
        raise UserError(f"checkpoint {source} holds a {resumed['model']} model, not {spec.name}")
    for key in OUTPUT_KEYS:
        check_writable(config[key], key)
    check_dataset_files(config)
    return config, spec, source, resumed


def train(config_files=(), overrides: dict | None = None, *, model: str | None = None,
          quiet: bool = False) -> dict:
    """Train, keep the best checkpoint by the validation metric, and test it.

    ``config_files``: YAML files, later ones winning; ``overrides``: settings that win over them
    (``--key=value`` strings or typed values); ``model``: the model's name (else a file's or the
    overrides' ``model``, else TiM4Rec). With ``checkpoint_path``, the run resumes that checkpoint
    as a new run: it starts from the checkpoint's settings (which the files and overrides change,
    all but the model's shape), from the last state the checkpoint kept (else its best), and writes
    a checkpoint of its own.

    Returns (and writes beside the log, as ``<run>.json``) the run's name, model, dataset, seed,
    settings, parameter count, checkpoint and log paths, the checkpoint it resumed, best epoch, best
    validation and test results, and each epoch's loss, training time and validation result.

    In a distributed launch (:mod:`pipeline.distributed`) every process calls this with the same
    arguments; they train one model together, and rank 0 alone writes files and logs.
    """
    from pipeline.trainer import ProjectTrainer, as_floats

    config, spec, source, resumed = run_config(config_files, overrides, model)
    if distributed.launched():
        distributed.setup(config)
    main = distributed.is_main()  # the one process that writes files and talks
    log = RunLog(config["state"], quiet=quiet or not main)
    try:
        run = distributed.broadcast(
            new_run(spec.name, config["dataset"], config["checkpoint_dir"], config["log_dir"],
                    config["tensorboard_dir"]) if main else None)
        logger.info("command: " + " ".join(sys.argv))
        if main and Path(config["checkpoint_dir"]).is_dir():
            for stale in checkpoint.remove_stale_temporaries(config["checkpoint_dir"]):
                logger.info(f"removed {stale}, left by a run killed while saving")
        seed_and_precision(config)
        dataset, train_data, valid_data, test_data, _ = load_data(config)
        if resumed is not None:
            check_data(resumed, dataset, source)
        if distributed.active():
            train_data = distributed.shard_train_loader(config, train_data)
        model_ = build_model(spec, config, train_data.dataset)
        if distributed.active():
            import torch

            torch.manual_seed(config["seed"] + distributed.rank())  # each its own dropout masks
            _describe_distributed(config)
        _describe(config, model_)

        extra = {"data": vocabulary.of(dataset),
                 "resumed_from": str(source) if source is not None else None}
        trainer = ProjectTrainer(config, model_, run, extra=extra,
                                 on_first_write=lambda: log.commit(run.log_file) if main else None)
        if resumed is not None:
            changed = changed_settings(resumed["config"], config)
            logger.info(f"settings changed since {source}: {changed or 'none'}")
            trainer.resume(resumed, source, changed)
        if trainer.start_epoch < config["epochs"]:
            trainer.fit(train_data, valid_data, saved=True, show_progress=config["show_progress"])
        else:
            logger.info(f"nothing to train: the checkpoint is at epoch {trainer.start_epoch - 1} "
                        f"of {config['epochs']}")
            trainer.write_checkpoint(verbose=True)
        replicas = distributed.gather_digests(model_) if distributed.active() else None
        if replicas is not None and len(set(replicas)) > 1:
            logger.warning("the processes ended with different weights: %s", replicas)
        test_result = trainer.evaluate(test_data, load_best_model=True,
                                       show_progress=config["show_progress"])
        test_result = as_floats(test_result)
        best_valid = as_floats(trainer.best_valid_result)
        logger.info("best valid: %s", best_valid)
        logger.info("test result:\n%s", format_metrics(test_result))
        logger.info("checkpoint: %s", trainer.saved_model_file)
        result = {
            "run": run.name,
            "model": spec.name,
            "dataset": config["dataset"],
            "seed": config["seed"],
            "config": plain_config(config),
            "resumed_from": extra["resumed_from"],
            "processes": distributed.world_size(),
            "train_samples": train_data.sample_size,  # per epoch, over all processes
            "valid_metric": config["valid_metric"],
            "parameters": sum(p.numel() for p in model_.parameters() if p.requires_grad),
            "checkpoint": trainer.saved_model_file,
            "log": str(run.log_file),
            "best_epoch": trainer.best_epoch,
            "best_valid_score": float(trainer.best_valid_score),
            "best_valid_result": best_valid,
            "test_result": test_result,
            "epochs": trainer.history,
        }
        if replicas is not None:
            result["replica_digests"] = replicas  # the final weights of each rank, hashed
        if main:
            with checkpoint.write_atomically(run.results, "w") as f:  # what report.py reads
                json.dump(result, f, indent=1)
        distributed.barrier()  # all ranks leave the process group together (shutdown, below)
        return result
    except BaseException as error:
        log.record_failure(error)
        raise
    finally:
        log.close()
        distributed.shutdown()


def _describe_distributed(config) -> None:
    world = distributed.world_size()
    logger.info(f"distributed: {world} processes ({distributed.backend()}), a global batch of "
                f"{config['train_batch_size']} ({config['train_batch_size'] // world} per process)")


def load(path, overrides: dict | None = None, *, allow_pickle: bool = False) -> Loaded:
    """A checkpoint with its config, its dataset (checked to be the data it was trained on), the
    data loaders of the split, and its model holding the best weights (RecBole's
    ``load_data_and_model``). ``overrides`` change settings of the saved run (e.g.
    ``eval_batch_size``, ``use_gpu``); ``allow_pickle`` also reads RecBole checkpoints such as the
    authors' (this unpickles the file: only for files you trust)."""
    path = Path(path)
    return _load(path, read_checkpoint(path, allow_pickle), overrides)


def _load(path: Path, data: dict, overrides: dict | None, keep_interactions: bool = True) -> Loaded:
    from pipeline.trainer import load_weights

    config, spec = build_config(data["model"], [], dict(overrides or {}),
                                base=_saved_settings(data))
    seed_and_precision(config)
    dataset, train_data, valid_data, test_data, interactions = load_data(config,
                                                                          keep_interactions)
    check_data(data, dataset, path)
    model = build_model(spec, config, train_data.dataset)
    load_weights(model, data["state_dict"], path, changed_settings(data["config"], config))
    return Loaded(config, model.eval(), dataset, train_data, valid_data, test_data, data, path,
                  interactions)


def evaluate(path, overrides: dict | None = None, *, allow_pickle: bool = False,
             quiet: bool = False) -> dict:
    """A checkpoint's validation and test metrics, on the split of its own data."""
    from pipeline.trainer import ProjectTrainer, as_floats

    path = Path(path)
    data = read_checkpoint(path, allow_pickle)
    log = RunLog({**data["config"], **(overrides or {})}.get("state"), quiet=quiet)
    try:
        loaded = _load(path, data, overrides, keep_interactions=False)  # metrics need none
        config = loaded.config
        for key, value in environment(config["device"]).items():
            logger.info(f"{key:>12}: {value}")
        trainer = ProjectTrainer(config, loaded.model, run=None)
        show = config["show_progress"]
        valid = trainer.evaluate(loaded.valid_data, load_best_model=False, show_progress=show)
        test = trainer.evaluate(loaded.test_data, load_best_model=False, show_progress=show)
        return {"model": config["model"], "dataset": config["dataset"],
                "epoch": loaded.checkpoint.get("epoch"), "valid_result": as_floats(valid),
                "test_result": as_floats(test)}
    finally:
        log.close()
