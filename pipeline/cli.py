"""Command-line entry points: ``run.py``, ``test.py``, ``recommend.py`` and every
``baseline/<Model>/run.py``.

Bad input ends in one line on stderr and exit status 2, never a traceback: everything the pipeline
can blame on the input raises :class:`~pipeline.errors.UserError`. Ctrl-C ends with status 130 and
SIGTERM with 143, each noted in the run's log.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from pipeline.errors import Terminated, UserError

OVERRIDES_HELP = """\
Any other --key=value sets a RecBole or model setting for this run, e.g. --dataset=ml-1m
--hidden_size=256 --epochs=50 --gpu_id=1 --checkpoint_path=saved/RUN.pth (resume training).
Values are read as Python literals (numbers, lists, True/False), anything else as a string."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UserError(message)


def _split_overrides(rest: list[str]) -> dict[str, str]:
    overrides = {}
    for arg in rest:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key or not sep:
            raise UserError(f"unrecognised argument '{arg}': settings are given as --key=value")
        if key in overrides and overrides[key] != value:
            raise UserError(f"--{key} is given twice with different values")
        overrides[key] = value
    return overrides


def parse_train_args(argv, fixed_model: str | None):
    parser = _Parser(
        prog=None if fixed_model is None else f"baseline/{fixed_model}/run.py",
        description=("Train a sequential recommender, keep its best checkpoint by the validation "
                     "metric, and test it." if fixed_model is None else
                     f"Train the {fixed_model} baseline with its settings in config.yaml beside "
                     f"this script."),
        epilog=OVERRIDES_HELP + "\nWith no --config, the model trains on MovieLens-100K.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="PATH", type=Path,
                        help="a YAML config file (repeatable; later files win), e.g. "
                             "config/config4beauty_64d.yaml")
    parser.add_argument("--config_files", metavar="'PATH PATH ...'", default=None,
                        help="RecBole's spelling: config files separated by spaces, after any "
                             "--config")
    if fixed_model is None:
        parser.add_argument("--model", default=None, metavar="NAME",
                            help="TiM4Rec (default), a baseline in baseline/, or any RecBole model")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train with N processes on this machine (data parallel: one GPU each, "
                             "or gloo on the CPU); several machines: see torchrun in the README")
    args, rest = parser.parse_known_args(argv)
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.config_files is not None:
        args.config += [Path(f) for f in args.config_files.split()]
    return args, _split_overrides(rest)


def parse_test_args(argv):
    parser = _Parser(
        description="Evaluate a checkpoint on its dataset's validation and test splits.",
        epilog=OVERRIDES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_checkpoint_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    return args, _split_overrides(rest)


def _add_checkpoint_arguments(parser) -> None:
    """``--checkpoint`` and ``--allow-pickle``, as test.py and recommend.py take them."""
    parser.add_argument("--checkpoint", required=True, metavar="PATH", type=Path,
                        help="a checkpoint written by run.py (saved/*.pth)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read RecBole checkpoints such as the authors' published "
                             "weights; this unpickles the file, which can run code: only for "
                             "files you trust")


def _terminate(signum, frame):
    raise Terminated()


def _report_errors(main):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # stop as Ctrl-C does: noted in the log
    try:
        main()
    except UserError as error:
        # In a distributed run every rank meets the same bad input: rank 0 speaks for all.
        if os.environ.get("RANK", "0") == "0" or getattr(error, "every_rank", False):
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)


def train_main(argv=None, model: str | None = None) -> None:
    """``run.py`` (model chosen by --model) or ``baseline/<model>/run.py`` (model fixed)."""
    def main():
        from pipeline.workflow import train

        args, overrides = parse_train_args(argv, model)
        if args.nproc > 1:
            return _spawn_training(args.nproc, model or args.model, args.config, overrides)
        train(args.config, overrides, model=model or args.model)

    _report_errors(main)


def _spawn_training(nproc: int, model, config_files, overrides) -> None:
    from pipeline import distributed
    from pipeline.workflow import run_config

    if distributed.launched():
        raise UserError("--nproc starts processes on this machine; under torchrun, give "
                        "--nproc_per_node to torchrun instead")
    # Bad input: one line, here, before any process starts. The config is built as each worker
    # will build it (LOCAL_WORLD_SIZE picks the GPUs); RecBole's Config also sets
    # CUDA_VISIBLE_DEVICES, which the workers must not inherit: both are put back.
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "LOCAL_WORLD_SIZE")}
    os.environ["LOCAL_WORLD_SIZE"] = str(nproc)
    try:
        config = run_config(config_files, overrides, model)[0]
        _check_gpus(config, nproc)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    status = distributed.spawn(nproc, _train_in_process, (model, config_files, overrides))
    if status:
        sys.exit(status)  # the failing process has said why


def _check_gpus(config, nproc: int) -> None:
    import torch

    if config["use_gpu"] and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise UserError(f"--nproc={nproc} needs {nproc} GPUs (one per process); "
                        f"{torch.cuda.device_count()} visible with gpu_id {config['gpu_id']!r}")


def _train_in_process(model, config_files, overrides) -> None:
    from pipeline.workflow import train

    _report_errors(lambda: train(config_files, overrides, model=model))


def test_main(argv=None) -> None:
    """``test.py``: print a checkpoint's validation and test metrics."""
    def main():
        from pipeline.workflow import evaluate, format_metrics

        args, overrides = parse_test_args(argv)
        result = evaluate(args.checkpoint, overrides, allow_pickle=args.allow_pickle)
        print(f"\n{result['model']} on {result['dataset']} ({args.checkpoint})")
        print("\nvalid\n" + format_metrics(result["valid_result"]))
        print("\ntest\n" + format_metrics(result["test_result"]))

    _report_errors(main)


def parse_recommend_args(argv):
    from pipeline.recommendations import HISTORIES

    parser = _Parser(
        description="Top-k items for the users of a checkpoint's dataset, or for new sequences.",
        epilog=OVERRIDES_HELP + "\nWithout --out, a table on stdout; messages go to stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_checkpoint_arguments(parser)
    parser.add_argument("--users", metavar="U1,U2,...", default=None,
                        help="users (raw tokens of the dataset file); default: every user")
    parser.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument("--history", choices=HISTORIES, default="all",
                        help="all: the user's whole history is the input and its items are left "
                             "out; test / valid: exactly the input of that evaluation")
    parser.add_argument("--keep-seen", action="store_true",
                        help="with --history=all: rank the items the user already interacted with")
    parser.add_argument("--sequences", metavar="FILE.jsonl", type=Path, default=None,
                        help='new users, one JSON object a line: {"id": ..., "items": [tokens], '
                             '"timestamps": [Unix seconds]}')
    parser.add_argument("--out", metavar="FILE.csv", type=Path, default=None,
                        help="write CSV rows user_id,rank,item_id,score here")
    parser.add_argument("--export-embeddings", metavar="FILE.npz", type=Path, default=None,
                        help="write the item embedding table (tokens, vectors) and stop")
    args, rest = parser.parse_known_args(argv)
    return args, _split_overrides(rest)


def recommend_main(argv=None) -> None:
    """``recommend.py``: recommendations (a table, or CSV with --out), or the item embeddings."""
    def main():
        from pipeline import recommendations
        from pipeline.checkpoint import write_atomically
        from pipeline.runlog import RunLog

        args, overrides = parse_recommend_args(argv)
        if args.export_embeddings is not None:
            path = recommendations.export_embeddings(
                args.checkpoint, args.export_embeddings, overrides=overrides,
                allow_pickle=args.allow_pickle)
            print(f"item embeddings: {path}", file=sys.stderr)
            return
        if args.out is not None:
            recommendations.check_output(args.out)
        users = None if args.users is None else [u for u in args.users.split(",") if u]
        log = RunLog(overrides.get("state", "WARNING"), stream=sys.stderr)
        try:
            rows = recommendations.batches(
                args.checkpoint, users=users, k=args.k, history=args.history,
                sequences=args.sequences, keep_seen=args.keep_seen, overrides=overrides,
                allow_pickle=args.allow_pickle, progress=True)
            if args.out is not None:
                with write_atomically(args.out, "w") as f:
                    f.write(",".join(recommendations.COLUMNS) + "\n")
                    for frame in rows:
                        frame.to_csv(f, header=False, index=False, float_format="%.6f")
                print(f"recommendations: {args.out}", file=sys.stderr)
            else:
                _print_table(rows)
        finally:
            log.close()

    _report_errors(main)


def _print_table(frames) -> None:
    print(f"{'user_id':>12}  {'rank':>4}  {'item_id':<24}  {'score':>10}")
    for frame in frames:
        for user, rank, item, score in frame.itertuples(index=False):
            print(f"{user:>12}  {rank:>4}  {item:<24}  {score:>10.4f}")
