"""RecBole's Trainer with this project's checkpoints, output folders and a sync-free
training step."""

from __future__ import annotations

import contextlib
import math
import time

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.utils import clip_grad_norm_
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from pipeline import autotune, checkpoint, cuda_graph, distributed, precompile
from pipeline.errors import UserError
from pipeline.runlog import RunPaths, environment
from pipeline.settings import plain_config


class _TensorBoard:
    """Stands in for a SummaryWriter: opens the run's folder at the first value written (so a run
    that ends before its first epoch leaves none), or writes nothing when ``folder`` is None."""

    def __init__(self, folder):
        self.folder, self.writer = folder, None

    def __getattr__(self, name):
        if self.folder is None:
            return lambda *args, **kwargs: None
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(self.folder))
        return getattr(self.writer, name)


@contextlib.contextmanager
def tensorboard_in(folder):
    """Within it, a RecBole ``Trainer`` built writes TensorBoard under ``folder`` (opened at the
    first value), or nowhere when ``folder`` is None."""
    # Trainer.__init__ opens its SummaryWriter under ./log_tensorboard of whatever the current
    # directory is; point it at the run's own folder instead.
    import recbole.trainer.trainer as rb_trainer

    original = rb_trainer.get_tensorboard
    writer = _TensorBoard(folder)
    rb_trainer.get_tensorboard = lambda _logger: writer
    try:
        yield
    finally:
        rb_trainer.get_tensorboard = original


def load_weights(model, state_dict, source, changed: str = "") -> None:
    """Load a state_dict, or say in one line why it does not fit the model (``changed``: the
    settings that differ from the checkpoint's, the likely cause)."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        cause = f" (settings changed since it: {changed})" if changed else ""
        raise UserError(f"checkpoint {source} does not match the model{cause}: "
                        f"{detail[:600]}") from None


def _on_cpu(value):
    """A copy of a state (tensors, in dicts and lists) on the CPU:
    kept while the model trains on."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


class _Loss(torch.nn.Module):
    """The model's training loss as a module's forward,
    so that DistributedDataParallel can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, interaction):
        return self.model.calculate_loss(interaction)


class ProjectTrainer(Trainer):
    """Differences from RecBole's Trainer, each for a reason given in the module it relies on:

    - checkpoints in the plain format of :mod:`pipeline.checkpoint`, named per run;
    - TensorBoard under the run's folder;
    - the training loss summed on the device and read once per epoch (no ``.item()`` per step),
      with the NaN check done on that sum;
    - on GPUs, the training step replayed as a CUDA graph (``cuda_graph``,
      :mod:`pipeline.cuda_graph`), and its Triton kernels compiled in parallel before the first
      step, or before the first evaluation of a run that only evaluates (``compile_ahead``,
      :mod:`pipeline.precompile`);
    - ``history``: loss, training time and validation result of every epoch, and ``best_epoch``,
      for the run's results file (:func:`pipeline.workflow.train`);
    - the checkpoint keeps the best state, written when validation improves, and the last one,
      written with it when the run ends in any way but a kill (stopped early, at its last epoch,
      Ctrl-C, SIGTERM, an error): :meth:`resume` continues from the last state where it is kept;
    - nothing is written (checkpoint, TensorBoard, the log through ``on_first_write``) before the
      first epoch's training has finished;
    - in a distributed run (:mod:`pipeline.distributed`): gradients averaged by
      DistributedDataParallel, evaluation sharded by batch and gathered before the metrics, and
      checkpoints written by rank 0 alone.
    """

    def __init__(self, config, model, run: RunPaths | None, extra: dict | None = None,
                 on_first_write=None):
        """``run`` None: an evaluation-only trainer that writes no TensorBoard and no checkpoint.
        ``extra``: entries every checkpoint of the run carries (its data, the checkpoint it
        resumed); ``on_first_write``: called once, before the run writes its first file."""
        writes = run is not None and distributed.is_main()
        with tensorboard_in(run.tensorboard_dir if writes else None):
            super().__init__(config, model)
        self.distributed_loss = None  # the loss as a DDP module, in a distributed run
        self._graphed = None  # the CUDA-graph step, built at the first epoch where it is used
        self._graph_stream = None  # the side stream of its warm-up and capture, where it is used
        self._compile_pending = precompile.wanted(self.device, config["compile_ahead"])
        if self.device.type == "cuda":
            reason = cuda_graph.reason_not_captured(
                config["cuda_graph"], config["model"], distributed.active(), self.optimizer,
                clip_grad_norm=self.clip_grad_norm)
            if reason is None:
                self._graph_stream = torch.cuda.Stream()
            else:
                self.logger.info(f"CUDA graph not used: {reason}")
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel

            # static_graph: the same parameters take part in every step, and those that never do
            # (the time gate of TiM4Rec's last layer, whose output nothing reads) are found once.
            # Built on the capture stream, as CUDA graphs of DDP steps require.
            stream = self._graph_stream
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                self.distributed_loss = DistributedDataParallel(
                    _Loss(model), device_ids=[self.device] if self.device.type == "cuda" else None,
                    static_graph=True)
        self.run = run
        self.saved_model_file = str(run.checkpoint) if run is not None else None
        self._last_valid_result = None
        self.history: list[dict] = []
        self.best_epoch = None
        self._extra = dict(extra or {})
        self._on_first_write = on_first_write
        self._best = None  # the best state (on the CPU), as the checkpoint's top level holds it
        self._last = None  # the state of the last validated epoch, where it is not the best

    def _first_write(self):
        if self._on_first_write is not None:
            self._on_first_write()
            self._on_first_write = None

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        from pipeline import precision  # enable_amp: the forward in bfloat16 autocast

        start = time.perf_counter()
        self.model.train()
        graphed = self._graphed_step(train_data) if loss_func is None else None
        if loss_func is None:  # in a distributed run, through DDP, which averages the gradients
            loss_func = self.distributed_loss or self.model.calculate_loss
        total = torch.zeros((), device=self.device)
        if isinstance(train_data.sampler, DistributedSampler):
            train_data.sampler.set_epoch(epoch_idx)  # a new permutation, the same on every rank
        batches = tqdm(train_data, total=len(train_data), ncols=100, leave=False,
                       desc=set_color(f"Train {epoch_idx:>5}", "pink"), disable=not show_progress)
        for interaction in batches:
            if self._compile_pending:
                self._compile_ahead(interaction)
            if graphed is not None:  # takes the batch from the CPU itself, without waiting
                with precision.autocast(self.device, self.enable_amp):  # its forward runs in it
                    total += graphed(interaction)
                continue
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            with precision.autocast(self.device, self.enable_amp):
                loss = loss_func(interaction)
            if isinstance(loss, tuple):  # multi-part losses are reported as their sum
                loss = sum(loss)
            loss.backward()  # no loss scaling: bfloat16 needs none (enable_scaler is refused)
            if self.clip_grad_norm:
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            self.optimizer.step()
            total += loss.detach()
        # The mean over ranks of each rank's summed batch losses, as one process would report it.
        total = distributed.all_sum(total).item() / distributed.world_size()
        if math.isnan(total):
            raise UserError(f"training diverged: the loss of epoch {epoch_idx} is NaN")
        self.history.append({"epoch": epoch_idx, "train_loss": total,
                             "train_s": time.perf_counter() - start})
        if distributed.is_main():
            self._first_write()  # the run has trained an epoch: from here on it leaves a log
        if self.device.type == "cuda" and distributed.is_main():
            autotune.save()  # now, not only at exit: a run stopped later keeps its kernel choices
        return total

    def _compile_ahead(self, interaction, train: bool = True):
        """Compile the Triton kernels of the training step (``train``) and of full-sort scoring
        side by side, once, before the first step or evaluation (:mod:`pipeline.precompile`);
        those of the captured step where it packs its batches (:class:`cuda_graph.PackedSize`)."""
        self._compile_pending = False
        packed = self._graphed.packed if train and self._graphed else None
        if packed is not None and not packed.fits(interaction):
            packed = None
        try:
            done = precompile.compile_step(self.model, interaction.to(self.device),
                                           amp=self.enable_amp, train=train,
                                           train_inside=packed.fixed if packed else None)
        except Exception as error:  # noqa: BLE001 (e.g. a Triton without the hooks it needs)
            self.logger.warning(f"Triton kernels not compiled ahead ({type(error).__name__}: "
                                f"{error}); each compiles at its first launch")
            return
        if done["kernels"]:
            self.logger.info(f"Triton: {done['kernels']} kernels compiled ahead in "
                             f"{done['compile_s']:.1f} s")

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False,
            callback_fn=None):
        def after_validation(epoch_idx, valid_score):
            if self.best_epoch != epoch_idx:  # the best state was just kept, if it is this one
                self._last = {"epoch": epoch_idx, "cur_step": self.cur_step,
                              "state_dict": _on_cpu(self.model.state_dict()),
                              "optimizer": _on_cpu(self.optimizer.state_dict())}
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        try:
            return super().fit(train_data, valid_data, verbose, saved, show_progress,
                               after_validation)
        finally:
            if self._graphed:
                self._graphed.release()  # before the process group goes (pipeline.cuda_graph)
            if saved and self._last is not None and self._best is not None:
                self.write_checkpoint()  # the last state beside the best one

    def write_checkpoint(self, verbose: bool = False) -> None:
        """Write the run's checkpoint: the best state, and the last one where it is another."""
        if distributed.is_main():
            self._first_write()
            checkpoint.save(self.saved_model_file, {
                **self._best, **self._extra, "model": self.config["model"],
                "config": plain_config(self.config), "run": self.run.name,
                "versions": {k: v for k, v in environment(self.device).items() if k != "device"},
                **({"last": self._last} if self._last is not None else {}),
            })
            if verbose:
                self.logger.info(set_color("Saving current", "blue") + f": {self.saved_model_file}")
        distributed.barrier()  # no rank reads the checkpoint before it is complete

    def _graphed_step(self, train_data):
        """The CUDA-graph training step (:mod:`pipeline.cuda_graph`), or None where it is off or
        cannot be used (said once in the log)."""
        if self._graphed is None and self._graph_stream is not None:
            # Built here, after a resumed optimizer state is loaded: it turns on ``capturable``.
            # Its batch size is the first batch's: the loader's, per rank in a distributed run.
            # Packed batches on one GPU only: ranks whose batches fit differently would replay
            # and run eagerly at the same step.
            packed = None
            if not distributed.active():
                packed = cuda_graph.packed_size(self.model, train_data,
                                                self.config["train_batch_size"])
            if packed is not None:
                self.logger.info(f"captured step: batches packed into {packed.size} slots")
            self._graphed = cuda_graph.GraphedStep(
                self.distributed_loss or self.model.calculate_loss, self.optimizer,
                warmup=(cuda_graph.DISTRIBUTED_WARMUP_STEPS if distributed.active()
                        else cuda_graph.WARMUP_STEPS),
                stream=self._graph_stream, device=self.device, packed=packed)
        return self._graphed

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """RecBole calls this when validation improves: keep that state as the best one."""
        self.best_epoch = epoch
        self._best = {
            "epoch": epoch, "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": as_floats(self._last_valid_result or self.best_valid_result),
            "state_dict": _on_cpu(self.model.state_dict()),
            "optimizer": _on_cpu(self.optimizer.state_dict()),
        }
        self._last = None
        self.write_checkpoint(verbose)

    def resume_checkpoint(self, resume_file):
        raise NotImplementedError("resume through resume(), which takes the loaded checkpoint")

    def resume(self, data: dict, source, changed: str = "") -> None:
        """Continue the run saved in ``data`` (a loaded checkpoint, read from ``source``): its last
        state where kept, else its best; the learning rate and weight decay are this run's. The
        best state so far is the checkpoint's until this run improves on it."""
        state = checkpoint.resume_state(data)
        load_weights(self.model, state["state_dict"], source, changed)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the state holds the old run's values
            group["lr"] = self.config["learning_rate"]
            if "weight_decay" in group:
                group["weight_decay"] = self.config["weight_decay"]
        cuda_graph.reset_capturable(self.optimizer)  # the graph, if any, turns it on again
        self.start_epoch = state["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = data["best_valid_score"]
        self.best_valid_result = data.get("best_valid_result")
        self.best_epoch = data["epoch"]
        self._best = {k: data[k] for k in ("epoch", "cur_step", "best_valid_score",
                                            "best_valid_result", "state_dict", "optimizer")}
        self._last = {k: v for k, v in state.items()} if "last" in data else None
        kept = "its last epoch" if "last" in data else "its best epoch"
        self.logger.info(f"Resuming {source} from {kept} ({state['epoch']}): training from "
                         f"epoch {self.start_epoch}")

    def _valid_epoch(self, valid_data, show_progress=False):
        # fit() saves a new best checkpoint before it records the new best result: keep it here.
        score, self._last_valid_result = super()._valid_epoch(valid_data, show_progress)
        if self.history:
            self.history[-1].update(valid_score=float(score),
                                    valid_result=as_floats(self._last_valid_result))
        return score, self._last_valid_result

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model:
            path = model_file or self.saved_model_file
            if self._best is not None and model_file is None:
                load_weights(self.model, self._best["state_dict"], path)  # what the file holds
            else:
                load_weights(self.model, checkpoint.load(path, map_location=self.device)[
                    "state_dict"], path)
            self.logger.info(f"Loaded the best weights from {path}")
        if self._compile_pending:  # a run that only evaluates: its scoring kernels
            first = next(iter(eval_data), None)  # (interaction, ...) of a RecBole eval loader
            if first is not None:
                self._compile_ahead(first[0] if isinstance(first, tuple) else first, train=False)
        if distributed.active():
            return self._sharded_evaluate(eval_data, show_progress)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def _sharded_evaluate(self, eval_data, show_progress):
        """RecBole's evaluation with rank r scoring batches r, r + N, ...; the collected per-user
        rows of every rank are put together before the metrics, which are thus a single
        process's."""
        from recbole.data.dataloader import FullSortEvalDataLoader
        from recbole.utils import EvaluatorType

        self.model.eval()
        if isinstance(eval_data, FullSortEvalDataLoader):
            eval_func = self._full_sort_batch_eval
            if self.item_tensor is None:
                self.item_tensor = eval_data._dataset.get_item_feature().to(self.device)
        else:
            eval_func = self._neg_sample_batch_eval
        if self.config["eval_type"] == EvaluatorType.RANKING:
            self.tot_item_num = eval_data._dataset.item_num
        rank, world = distributed.rank(), distributed.world_size()
        batches = tqdm(eval_data, total=len(eval_data), ncols=100, leave=False,
                       desc=set_color("Evaluate   ", "pink"), disable=not show_progress)
        for index, batched_data in enumerate(batches):
            if index % world == rank:
                interaction, scores, positive_u, positive_i = eval_func(batched_data)
                self.eval_collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
        self.eval_collector.model_collect(self.model)
        struct = self.eval_collector.get_data_struct()
        for key in PER_ROW_RESULTS:
            if self.eval_collector.register.need(key):
                rows = distributed.gather_rows(struct.get(key) if key in struct else None)
                if rows is not None:
                    struct.set(key, rows)
        return self.evaluator.evaluate(struct)


# What RecBole's collector stores per evaluated row (user or interaction), as opposed to
# dataset-wide values that every rank holds whole.
PER_ROW_RESULTS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")


def as_floats(result):
    """A metrics dict with plain Python floats (RecBole hands out numpy scalars), or None."""
    return None if result is None else {k: float(v) for k, v in result.items()}
