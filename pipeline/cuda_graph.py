"""The whole training step, forward, backward and optimizer, replayed as one CUDA graph.

An eager step of a small model issues a few hundred small kernels from Python; where the GPU
finishes them faster than the host launches them, the host sets the pace (TiM4Rec at L 50, as
against L 200, where the GPU sets it: BENCHMARKS.md, section GPU step and memory). Captured once,
the step is one graph launch; the kernels, their order and their inputs are those of the eager
step, so what is computed does not change. Dropout stays random from
step to step (PyTorch advances the CUDA generator's offset on every replay).

What a graph needs, and what this module does about it:

- Fixed shapes and addresses: the batch is copied into tensors captured once. The full batch size
  is the first batch's; a batch of another size (the last, partial batch of an epoch) runs
  eagerly, with the same parameters and optimizer. A model that packs its batches' real positions
  (TiM4Rec's ``skip_padding``) packs them into a fixed number of slots (:class:`PackedSize`),
  which a batch's lengths, read on the host before it is copied, must fit; one that does not runs
  eagerly, padded.
- No wait for the host: a batch still on the CPU is pinned and copied into those tensors without
  blocking, behind the replay before it on the same stream, so the host prepares the next batches
  while the GPU works (a plain ``.to(device)`` from pageable memory waits for the GPU to go idle).
- A capturable optimizer: ``capturable=True`` keeps Adam's step count on the GPU.
- No host synchronisation inside the step: nothing in the models here reads a GPU value on the
  host during training; a model that does fails to capture, and training goes on eagerly with one
  warning that says why.
- A fixed learning rate: it is baked into the graph; a change of any group's learning rate is
  detected before a replay and the step is captured again.

In a distributed run the graph holds DDP's gradient all-reduce too: NCCL calls can be captured.
What PyTorch asks for that: DDP built on the stream that warms up and captures, and eleven eager
DDP steps before the capture. Every rank sees batches of the same
sizes (DistributedSampler pads the ranks to equal length), so all ranks replay, or all run eagerly,
at the same step. The graph is released before the process group is destroyed.

Mixed precision (``enable_amp``, :mod:`pipeline.precision`): a step called under autocast runs
its forward in that autocast and its backward and optimizer outside it, eagerly and when captured
(the captured forward casts the weights anew on each replay); a call under another autocast
than the captured step's captures it again.

``cuda_graph: auto`` captures the step of the models in :data:`VERIFIED_MODELS` on one GPU and of
those in :data:`VERIFIED_DISTRIBUTED_MODELS` on several; ``True`` captures any model's. Not used
(the reason is logged once): with gradient clipping or an optimizer without ``capturable``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

# Models whose captured step has been run and checked on a GPU (tests/test_cuda_graph.py,
# bench/gpu_speed.py), and with DDP on two GPUs (tests/test_distributed.py,
# bench/ddp_throughput.py): ``cuda_graph: auto`` captures these; ``True`` tries any model.
VERIFIED_MODELS = ("TiM4Rec", "SASRec", "Mamba4Rec")
VERIFIED_DISTRIBUTED_MODELS = ("TiM4Rec",)
# Eager steps before capturing: library handles, Triton autotuning, optimizer state.
WARMUP_STEPS = 2
DISTRIBUTED_WARMUP_STEPS = 11  # what DistributedDataParallel needs before its hooks can be captured


class PackedSize(NamedTuple):
    """The fixed number of slots, ``size``, of a model's packed batches in a captured step: the
    model defines ``pack_size_for(lengths, batch_size)``, ``fits_pack_size(interaction, size)``
    and ``fixed_pack_size(size)`` (a context), as TiM4Rec does (``skip_padding``)."""

    model: torch.nn.Module
    size: int

    def fits(self, interaction) -> bool:
        """Whether a batch's real positions fit (read on the host)."""
        return self.model.fits_pack_size(interaction, self.size)

    def fixed(self, model=None):
        """A context in which ``model`` (default: this one; or a copy of it) packs at ``size``."""
        return (self.model if model is None else model).fixed_pack_size(self.size)


def packed_size(model, train_data, batch_size: int) -> PackedSize | None:
    """The :class:`PackedSize` of a model's captured step over ``train_data`` (a RecBole loader of
    sequences), or None where the model does not pack."""
    return packed_size_for(model, train_data.dataset.inter_feat[model.ITEM_SEQ_LEN], batch_size)


def packed_size_for(model, lengths, batch_size: int) -> PackedSize | None:
    """:func:`packed_size` for batches drawn from sequences of these ``lengths`` [N]."""
    size_for = getattr(model, "pack_size_for", None)
    size = size_for(lengths, batch_size) if size_for is not None else None
    return None if size is None else PackedSize(model, size)


def reason_not_captured(setting, model: str, distributed: bool, optimizer, *,
                        clip_grad_norm) -> str | None:
    """Why a GPU run with ``cuda_graph: setting`` (auto, True, False) keeps the eager step, or None
    when its step is captured."""
    if setting is False:
        return "cuda_graph is False"
    checked = VERIFIED_DISTRIBUTED_MODELS if distributed else VERIFIED_MODELS
    if setting == "auto" and model not in checked:
        where = "with several GPUs" if distributed else "on one GPU"
        return f"cuda_graph auto is for {', '.join(checked)} {where}; True tries it here"
    return unsupported_reason(optimizer, clip_grad_norm=clip_grad_norm)


def unsupported_reason(optimizer, *, clip_grad_norm) -> str | None:
    """Why the training step cannot be captured here, or None. Mixed precision is no reason: the
    step is captured inside its bfloat16 autocast (:class:`GraphedStep`)."""
    if clip_grad_norm:
        return "gradient clipping (clip_grad_norm) is on"
    if "capturable" not in optimizer.defaults:
        return f"optimizer {type(optimizer).__name__} has no capturable mode"
    return None


def make_capturable(optimizer) -> None:
    """Turn on ``capturable``: step counts live on the parameters' device (also resumed ones)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            step = state.get("step")
            if torch.is_tensor(step) and step.device != param.device:
                state["step"] = step.to(param.device, torch.float32)
    optimizer.defaults["capturable"] = True


def reset_capturable(optimizer) -> None:
    """Undo :func:`make_capturable`, as in a state loaded from a CUDA-graph run's checkpoint: the
    resuming run decides for itself (PyTorch refuses a capturable step on the CPU)."""
    for group in optimizer.param_groups:
        if group.get("capturable"):
            group["capturable"] = False
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to("cpu", torch.float32)
    if optimizer.defaults.get("capturable"):
        optimizer.defaults["capturable"] = False


class GraphedStep:
    """``step(interaction) -> loss`` (a detached GPU scalar): zero_grad, loss, backward, optimizer.

    ``interaction``: a batch on the CPU or on ``device`` (default: the current CUDA device).
    Batches of ``batch_size`` rows (default: the first batch's) are replayed from a graph captured
    at the ``warmup + 1``-th such batch; any other batch, and every batch before, runs eagerly.
    ``stream``: the side stream of the warm-up and the capture (a DDP module must have been built
    on it). ``packed``: the model packs batches into this many slots in the warm-up and the
    capture; a batch that does not fit runs eagerly.

    Called under ``torch.autocast`` (the trainer's, with ``enable_amp``), the step runs its
    forward in that autocast, and backward and the optimizer outside it, as PyTorch advises, and
    a step captured under one autocast is captured again under another.
    """

    def __init__(self, loss_func, optimizer, batch_size: int | None = None,
                 warmup: int = WARMUP_STEPS, stream=None, device=None,
                 packed: PackedSize | None = None):
        self.loss_func = loss_func
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda", torch.cuda.current_device())
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.warmup = warmup
        self.stream = stream or torch.cuda.Stream()
        self.graph = None
        self.static_batch = None
        self.static_loss = None
        self.captured_lrs = None
        self.captured_autocast = None
        self.warm_steps = 0
        self.failed = None  # why capture failed, once it has
        self.packed = packed
        make_capturable(optimizer)

    def _lrs(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def _autocast(self) -> tuple:
        """The caller's autocast on the step's device: ``(enabled, dtype or None)``."""
        kind = self.device.type
        enabled = torch.is_autocast_enabled(kind)
        return enabled, torch.get_autocast_dtype(kind) if enabled else None

    def _forward(self, interaction, autocast: tuple):
        """The loss under ``autocast`` (from :meth:`_autocast`). No cast is cached, so that in a
        capture each cast of a weight is a kernel of the graph: a replay casts the weights as they
        are then, not as a warm-up step found them."""
        enabled, dtype = autocast
        with torch.autocast(self.device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
            return self.loss_func(interaction)

    def _eager(self, interaction, autocast: tuple):
        interaction = interaction.to(self.device)
        # Once captured, keep the gradient tensors: the graph's backward writes into them, so that
        # ``param.grad`` is always the last step's gradient, whichever way that step ran.
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        loss = self._forward(interaction, autocast)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _rows(self, interaction) -> int:
        return len(next(iter(interaction.interaction.values())))

    def _matches(self, interaction) -> bool:
        static = self.static_batch.interaction
        fields = interaction.interaction
        return fields.keys() == static.keys() and all(
            fields[k].shape == static[k].shape and fields[k].dtype == static[k].dtype
            for k in fields)

    def _fixed(self):
        """The shapes of the captured step (see ``packed``)."""
        return self.packed.fixed() if self.packed else contextlib.nullcontext()

    def _warm(self, interaction, autocast: tuple):
        # On the capture's side stream, as PyTorch asks of the steps that precede a capture.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), self._fixed():
            loss = self._eager(interaction, autocast)
        torch.cuda.current_stream().wait_stream(self.stream)
        self.warm_steps += 1
        return loss

    def _capture(self, interaction, autocast: tuple):
        from recbole.data.interaction import Interaction

        self.static_batch = Interaction(
            {k: v.to(self.device, copy=True) for k, v in interaction.interaction.items()})
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated by the graph
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, stream=self.stream), self._fixed():
            loss = self._forward(self.static_batch, autocast)
            loss.backward()
            self.optimizer.step()
        self.static_loss = loss.detach()
        self.captured_lrs, self.captured_autocast = self._lrs(), autocast
        logger.info("training step captured as a CUDA graph (batch of %d)", self.batch_size)

    def release(self) -> None:
        """Free the graph (and with it its memory pool); later batches run eagerly.

        A graph that holds NCCL calls must be gone before its process group is destroyed: the
        trainer releases it at the end of training.
        """
        if self.graph is not None:
            torch.cuda.synchronize()
            self.graph.reset()
        self.graph = self.static_batch = self.static_loss = None
        self.failed = self.failed or "released"

    def __call__(self, interaction):
        autocast = self._autocast()
        with torch.autocast(self.device.type, enabled=False):  # only the forward runs in it
            return self._step(interaction, autocast)

    def _step(self, interaction, autocast: tuple):
        if self.batch_size is None:
            self.batch_size = self._rows(interaction)
        if (self.failed or self._rows(interaction) != self.batch_size
                or (self.packed and not self.packed.fits(interaction))):
            return self._eager(interaction, autocast)
        if self.graph is None and self.warm_steps < self.warmup:
            return self._warm(interaction, autocast)
        if self.graph is not None and (self._lrs() != self.captured_lrs
                                       or autocast != self.captured_autocast
                                       or not self._matches(interaction)):
            self.graph = None  # recapture for the new learning rate, autocast or batch layout
        if self.graph is None:
            try:
                self._capture(interaction, autocast)
            except Exception as error:  # noqa: BLE001 - any capture failure means: train eagerly
                self.graph = None
                self.failed = " ".join(str(error).split())[:300] or type(error).__name__
                logger.warning("CUDA graph capture failed (%s); training eagerly", self.failed)
                torch.cuda.synchronize()
                return self._eager(interaction, autocast)
        for key, value in self.static_batch.interaction.items():
            source = interaction[key]
            value.copy_(source.pin_memory() if source.device.type == "cpu" else source,
                        non_blocking=True)
        self.graph.replay()
        return self.static_loss
