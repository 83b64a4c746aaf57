"""The two things a user runs: train a model, and evaluate a checkpoint."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from pipeline import checkpoint, distributed
from pipeline.errors import UserError
from pipeline.registry import ModelSpec
from pipeline.runlog import RunLog, environment, new_run
from pipeline.settings import build_config, check_dataset_files

logger = logging.getLogger(__name__)


def _seed_and_precision(config) -> None:
    import torch
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    # TF32 changes float32 matmul results; the paper's protocol keeps it off (opt-in here).
    torch.backends.cuda.matmul.allow_tf32 = bool(config["enable_tf32"])
    torch.backends.cudnn.allow_tf32 = bool(config["enable_tf32"])


def _load_data(config):
    from recbole.data import create_dataset, data_preparation

    check_dataset_files(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    if max(config["topk"]) >= dataset.item_num:  # full ranking cannot cut off past the item count
        raise UserError(f"topk {config['topk']} needs more items than the {dataset.item_num - 1} "
                        f"that dataset '{config['dataset']}' has after filtering")
    return data_preparation(config, dataset)


def _build_model(spec: ModelSpec, config, dataset):
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])  # the same initial weights however the data loaded
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
    """``{'hit@10': .1, 'ndcg@10': .05, ...}`` as a table: one row per cut-off, one column per metric."""
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


def train(model: str | None = None, config_files=(), overrides: dict | None = None,
          quiet: bool = False) -> dict:
    """Train, keep the best checkpoint by the validation metric, and test it.

    Returns (and writes beside the log, as ``<run>.json``) the run's name, model, dataset, seed,
    parameter count, checkpoint and log paths, best epoch, best validation and test results, and
    each epoch's loss, training time and validation result.

    In a distributed launch (:mod:`pipeline.distributed`) every process calls this with the same
    arguments; they train one model together, and rank 0 alone writes files and logs.
    """
    from pipeline.trainer import ProjectTrainer, as_floats

    config, spec = build_config(model, list(config_files), dict(overrides or {}))
    if distributed.launched():
        distributed.setup(config)
    main = distributed.is_main()  # the one process that writes files and talks
    log = RunLog(config["state"], quiet=quiet or not main)
    try:
        run = distributed.broadcast(
            new_run(spec.name, config["dataset"], config["checkpoint_dir"], config["log_dir"],
                    config["tensorboard_dir"]) if main else None)
        logger.info("command: " + " ".join(sys.argv))
        _seed_and_precision(config)
        train_data, valid_data, test_data = _load_data(config)
        if distributed.active():
            train_data = distributed.shard_train_loader(config, train_data)
        model_ = _build_model(spec, config, train_data.dataset)
        if distributed.active():
            import torch

            torch.manual_seed(config["seed"] + distributed.rank())  # each its own dropout masks
            _describe_distributed(config)
        if main:
            log.commit(run.log_file)  # the run is valid: from here on it leaves a log
        _describe(config, model_)

        trainer = ProjectTrainer(config, model_, run)
        if config["checkpoint_path"]:
            trainer.resume_checkpoint(Path(config["checkpoint_path"]).expanduser())
        if trainer.start_epoch < config["epochs"]:
            trainer.fit(train_data, valid_data, saved=True, show_progress=config["show_progress"])
        else:
            logger.info(f"nothing to train: the checkpoint is at epoch {trainer.start_epoch - 1} "
                        f"of {config['epochs']}")
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
            run.results.write_text(json.dumps(result, indent=1))  # what report.py reads
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


def read_checkpoint(path, allow_pickle: bool = False) -> dict:
    """This project's checkpoint, or (with ``allow_pickle``) a RecBole one such as the authors'."""
    try:
        return checkpoint.load(path)
    except UserError as error:
        if allow_pickle and "unpickling" in str(error):
            return checkpoint.load_recbole_checkpoint(path)
        raise


def evaluate_checkpoint(path, overrides: dict | None = None, allow_pickle: bool = False,
                        quiet: bool = False) -> dict:
    """Rebuild the checkpoint's data split and model, load its weights, and return its metrics.

    ``overrides`` change settings of the saved run (e.g. ``eval_batch_size``, ``device``).
    """
    from pipeline.trainer import ProjectTrainer, as_floats, load_weights

    data = read_checkpoint(path, allow_pickle)
    saved = {k: v for k, v in data["config"].items() if k != "checkpoint_path"}
    config, spec = build_config(data["model"], [], {**saved, **(overrides or {})})
    log = RunLog(config["state"], quiet=quiet)
    try:
        _seed_and_precision(config)
        _, valid_data, test_data = _load_data(config)
        model_ = _build_model(spec, config, test_data.dataset)
        load_weights(model_, data["state_dict"], path)
        for key, value in environment(config["device"]).items():
            logger.info(f"{key:>12}: {value}")
        trainer = ProjectTrainer(config, model_, run=None)
        show = config["show_progress"]
        valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=show)
        test = trainer.evaluate(test_data, load_best_model=False, show_progress=show)
        return {"model": spec.name, "dataset": config["dataset"], "epoch": data.get("epoch"),
                "valid_result": as_floats(valid), "test_result": as_floats(test)}
    finally:
        log.close()
