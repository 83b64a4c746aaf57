"""TiM4Rec: a time-aware structured state space duality (SSD, Mamba-2) model
for sequential recommendation.

Reference:
    Hao Fan et al. "TiM4Rec: An Efficient Sequential Recommendation Model Based on Time-Aware
    Structured State Space Duality Model." Neurocomputing 654 (2025) 131270. arXiv:2409.16182.

The hyperparameters and their defaults live in ``config/model/TiM4Rec.yaml``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from pipeline import ROOT, compat
from pipeline.scoring import ItemScoring
from ssd import TimeAwareSSD
from ssd_ops.amp import amp_backward, amp_forward, cast, without_autocast
from ssd_ops.backend import resolve_backend, uses_triton
from ssd_ops.fused_block import column_sums
from ssd_ops.packing import Packing, at_positions

compat.apply()  # RecBole 1.2.1 on numpy 2 and pandas 3, in RecBole's own flow too (its docstring)
logger = logging.getLogger(__name__)

# Submodules that exist only with is_time; an upstream checkpoint may carry them either way.
_TIME_ONLY = ("layer_norm_time.", "conv1d4time_", "mlp4time_scale.", "time_gate_residual.",
              "time_layer_norm.")


class FFNKernels(NamedTuple):
    """The FFN's Hardswish and dropout, as :class:`_InnerFFN` calls them.

    ``fwd(pre, p) -> (hidden, state)``: ``hidden = Dropout(Hardswish(pre))``, and what backward
    needs to draw the same mask; ``bwd(dhidden, pre, p, state) -> (dpre, hidden)``: the gradient of
    ``pre`` and ``hidden`` again.
    """

    fwd: Callable
    bwd: Callable


@functools.cache
def torch_ffn_kernels() -> FFNKernels:
    """PyTorch's kernels: ``nn.Dropout``'s (the same random stream, the same mask); the state is
    the mask."""

    def fwd(pre, p):
        hidden = F.hardswish(pre)
        return torch.ops.aten.native_dropout(hidden, p, True) if p > 0 else (hidden, None)

    def bwd(dhidden, pre, p, mask):
        hidden = F.hardswish(pre)
        if mask is not None:
            scale = 1.0 / (1.0 - p) if p < 1 else 0.0  # p = 1 drops everything
            hidden, dhidden = hidden * mask * scale, dhidden * mask * scale
        return torch.ops.aten.hardswish_backward(dhidden, pre), hidden

    return FFNKernels(fwd, bwd)


@functools.cache
def triton_ffn_kernels() -> FFNKernels:
    """One Triton kernel each way (:mod:`kernels.act_dropout`); the state is the mask's seed."""
    from kernels.act_dropout import act_dropout, act_dropout_bwd
    from kernels.dropout import draw_seed

    def fwd(pre, p):
        seed = draw_seed(pre.device) if p > 0 else None
        return act_dropout(pre, p, seed), seed

    def bwd(dhidden, pre, p, seed):  # dhidden is the node's own: its gradient goes over it
        return act_dropout_bwd(dhidden, pre, p, seed, recompute_output=True, overwrite_dout=True)

    return FFNKernels(fwd, bwd)


class _InnerFFN(torch.autograd.Function):
    """``fc2(Dropout(Hardswish(fc1(h))))`` that keeps, of the [.. 4D] hidden layer, fc1's output
    (or nothing, with ``recompute``: fc1 runs again in backward) and what draws the dropout mask
    again (the mask, or its seed), where autograd would keep fc1's output, the mask and fc2's
    input. The same products and mask: the gradients are those of the plain modules.

    Under autocast (bfloat16), fc1 and fc2 multiply in bfloat16, the hidden layer is bfloat16
    (its activation and dropout computed in float32 by the Triton kernel), and so is what the
    node keeps of h; the gradients of h and of the weights come back in their dtypes (float32).
    """

    @staticmethod
    @amp_forward
    def forward(ctx, h, w1, b1, w2, b2, p: float, recompute: bool, kernels: FFNKernels):
        ctx.h_dtype = h.dtype
        h = h.to(ctx.dtype)  # as the products take it (and as it is kept)
        pre = F.linear(h, *cast(ctx.dtype, w1, b1))  # [.. 4D]
        hidden, state = kernels.fwd(pre, p)
        ctx.p, ctx.kernels = p, kernels
        ctx.save_for_backward(h, w1, b1, w2, state, None if recompute else pre)
        return F.linear(hidden, *cast(ctx.dtype, w2, b2))

    @staticmethod
    @amp_backward
    def backward(ctx, grad_out):  # [.. D]
        h, w1, b1, w2, state, pre = ctx.saved_tensors
        w1_, b1_, w2_ = cast(ctx.dtype, w1, b1, w2)
        if pre is None:
            pre = F.linear(h, w1_, b1_)  # [.. 4D]
        grad_out = grad_out.to(ctx.dtype)
        grad_pre, hidden = ctx.kernels.bwd(grad_out @ w2_, pre, ctx.p, state)
        del pre
        grad_out2 = grad_out.reshape(-1, grad_out.shape[-1])  # [T D]
        grad_w2 = grad_out2.t() @ hidden.reshape(-1, hidden.shape[-1])
        del hidden
        grad_pre2 = grad_pre.reshape(-1, grad_pre.shape[-1])  # [T 4D]
        grad_w1 = grad_pre2.t() @ h.reshape(-1, h.shape[-1])
        # in the dtypes of h and of the parameters (a no-op without amp)
        return ((grad_pre @ w1_).to(ctx.h_dtype), *cast(w1.dtype, grad_w1, column_sums(grad_pre2)),
                *cast(w2.dtype, grad_w2, column_sums(grad_out2)), None, None, None)


def dropout_add_layer_norm(x, residual, dropout: nn.Dropout, norm: nn.LayerNorm, fused: bool):
    """``norm(dropout(x) + residual)`` [B L D], or ``norm(dropout(x))`` when residual is None.

    ``fused`` (CUDA): as one Triton kernel forward and one backward (:mod:`kernels.add_norm`),
    which keeps the sum and a seed for backward rather than the mask. The same values and
    gradients; its dropout masks follow nn.Dropout's distribution with other draws.

    The dropout, the sum and the LayerNorm run in the norm's dtype at least, and so does the
    result: under autocast, float32 from a bfloat16 ``x`` (the output of a product).
    """
    if fused:
        from kernels.add_norm import dropout_add_norm

        return dropout_add_norm(x, residual, norm.weight, norm.bias, norm.eps,
                                dropout.p if dropout.training else 0.0)
    dtype = torch.promote_types(x.dtype, norm.weight.dtype)
    with torch.autocast(x.device.type, enabled=False):  # CPU autocast would keep bfloat16
        out = dropout(x.to(dtype))
        return norm(out if residual is None else out + residual)


class _ItemLookup(torch.autograd.Function):
    """``F.embedding(indices, weight, padding_idx)`` whose weight gradient is summed by
    :func:`kernels.embedding_grad.embedding_grad` (atomic additions in one pass) rather than by
    PyTorch's sort and sums of runs: the same sums in another order."""

    @staticmethod
    def forward(ctx, indices, weight, padding_idx):
        ctx.save_for_backward(indices)
        ctx.num_rows, ctx.padding_idx, ctx.dtype = weight.shape[0], padding_idx, weight.dtype
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):  # [.. N]
        from kernels.embedding_grad import embedding_grad

        (indices,) = ctx.saved_tensors
        return None, embedding_grad(indices, grad, ctx.num_rows, ctx.padding_idx, ctx.dtype), None


def embedding_lookup(embedding: nn.Embedding, indices, fused: bool):
    """``embedding(indices)``; ``fused`` (CUDA): its weight gradient by :class:`_ItemLookup`."""
    if fused and embedding.weight.requires_grad and torch.is_grad_enabled():
        return _ItemLookup.apply(indices, embedding.weight, embedding.padding_idx)
    return embedding(indices)


class FeedForward(nn.Module):
    """Position-wise FFN: ``LayerNorm(Dropout(fc2(Dropout(Hardswish(fc1(h))))) + h)``, D -> 4D -> D.

    When training on a GPU with ``recompute`` or ``fused``, the inner part runs as
    :class:`_InnerFFN`: the same values and gradients, less kept for backward (GPU memory is what
    limits batch and length there). ``fused`` (the Triton path): with one Triton kernel for
    Hardswish and dropout each way, and the closing dropout, residual and LayerNorm as another
    (:func:`dropout_add_layer_norm`). ``recompute``: fc1 runs again in backward, so that nothing
    of the hidden layer is kept but the mask (or its seed). Otherwise it runs as the plain modules.
    """

    def __init__(self, d_model: int, dropout: float, recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)
        self.activation = nn.Hardswish()
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-12)  # fixed, as upstream: not norm_eps

    def inner(self, h, recompute: bool = False, fused: bool = False):  # [B L D] -> [B L D]
        """``fc2(Dropout(Hardswish(fc1(h))))``; with ``recompute`` or ``fused``, through
        :class:`_InnerFFN` (``fused``: with the Triton kernels)."""
        if recompute or fused:
            p = self.dropout.p if self.training else 0.0
            kernels = triton_ffn_kernels() if fused else torch_ffn_kernels()
            return _InnerFFN.apply(h, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                   self.fc2.bias, p, recompute, kernels)
        return self.fc2(self.dropout(self.activation(self.fc1(h))))

    def forward(self, h, fused: bool = False):  # [B L D]
        train_on_gpu = h.is_cuda and torch.is_grad_enabled()
        out = self.inner(h, self.recompute and train_on_gpu, fused and train_on_gpu)
        return dropout_add_layer_norm(out, h, self.dropout, self.layer_norm, fused)


class TiSSDLayer(nn.Module):
    """One layer: ``LayerNorm(Dropout(TiSSD(x)) + x)``, then the optional FFN.

    The residual is dropped when the model has a single layer (as upstream). Where the SSD block
    runs fused (``fused`` on the Triton path, see :class:`ssd.TimeAwareSSD`), each dropout, residual
    and LayerNorm runs as one kernel too (:func:`dropout_add_layer_norm`). ``forward(x, tau, at)``
    with ``at`` [B] gives the layer's output at one position per sequence, [B D]: everything after
    the scan is position-wise, so it runs there only. With ``packing``, x [1 S D] holds the batch's
    real positions (:class:`~ssd_ops.packing.Packing`), and ``at`` is slots.
    """

    def __init__(self, d_model: int, dropout: float, norm_eps: float, residual: bool, is_ffn: bool,
                 recompute: bool = False, **ssd_kwargs):
        super().__init__()
        self.residual = residual
        self.ssd = TimeAwareSSD(d_model, norm_eps=norm_eps, **ssd_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = FeedForward(d_model, dropout, recompute) if is_ffn else None

    def forward(self, x, tau=None, at=None, packing: Packing | None = None):  # x [B L D] or [1 S D]
        fused = self.ssd.fused and uses_triton(self.ssd.backend, x)
        out, tau = self.ssd(x, tau, at, packing)  # [B L D] ([1 S D]), or [B D] with at
        residual = None
        if self.residual:
            residual = x if at is None else at_positions(x, at)
        h = dropout_add_layer_norm(out, residual, self.dropout, self.layer_norm, fused)
        return (self.ffn(h, fused) if self.ffn is not None else h), tau


class TiM4Rec(ItemScoring, SequentialRecommender):
    r"""TiM4Rec: stacked time-aware SSD layers over item embeddings;
    next-item scores by dot product.

    The time signal is the sequence of gaps between consecutive interaction times,
    ``d_0 = 0, d_t = ts_t - ts_{t-1}``, dropped out and normalised over the sequence axis, repeated
    over the SSD heads. Each layer scales its SSD step sizes by a gate computed from it (see
    :class:`ssd.TimeAwareSSD`) and hands a refined signal to the next layer.

    NOTE:
        Faithful to the authors' code by default, where it differs from a cleaner reading:

        - The time gaps are not masked at padded positions: at the first padded slot
          ``d = 0 - ts_last`` (about -1e9 on raw Unix seconds), and the LayerNorm over
          the sequence sees it. ``time_mask_padding: True`` zeroes the gaps at padded
          slots instead (an ablation).
        - The convolution on x, B, C is followed by Hardswish (``conv_activation: silu`` gives
          Mamba-2's SiLU).
        - The loss is cross-entropy over all items; ``loss_type`` other than CE is refused rather
          than silently ignored as upstream does.
        - Timestamps are read as RecBole stores them (float32), like upstream: present-day Unix
          seconds are rounded to steps of 64 s (before 2004) or 128 s (after).
        - Without is_time the time-branch modules are not built; their weights in an upstream
          checkpoint, if present, are unused and skipped on load.

        The last layer computes what follows its scan (gated norm, out_proj, residual, LayerNorm,
        FFN: all position-wise) at the last real position only, the one that is scored
        (``last_position_only: True``, the default): the same scores and gradients as computing
        every position and reading one, in less time. Its dropout then draws masks for one
        position per sequence, so a seed gives other masks than upstream's;
        ``last_position_only: False`` computes every position, as upstream.

        The layers compute at the real positions only (``skip_padding: True``, the default): the
        batch's sequences laid end to end without their padding (:class:`~ssd_ops.packing.Packing`),
        the convolution and the scan kept from crossing from one sequence to the next. Nothing at a
        real position reads a padded one there (the convolution and the scan are causal, the
        rest position-wise), so the scores and gradients are those of the padded batch; the time
        branch, which mixes positions along the whole sequence, keeps the padded layout. Dropout
        then draws masks for the real positions only. Where the host knows the batch's total
        length without waiting for the GPU: on the CPU (for a batch of which at most
        ``CPU_PACK_BELOW`` is real: above it, padded runs faster there), and in the training step
        captured as a CUDA graph on one GPU, whose number of slots is fixed from the training
        data (:meth:`pack_size_for`; a batch over it runs eagerly, padded); elsewhere on a GPU
        the batch stays padded. ``skip_padding: False`` computes at every position, as upstream.

        On the Triton path with ``fused`` (the default), dropout masks are drawn by this project's
        Triton kernels (:mod:`kernels.dropout`): nn.Dropout's distribution, not its random stream,
        so a seed gives other masks than upstream's; the item embedding's gradient is summed by
        atomic additions (:mod:`kernels.embedding_grad`), in an order that varies from run to run
        (PyTorch's sums under ``torch.use_deterministic_algorithms``). ``fused: False`` uses
        nn.Dropout and PyTorch's embedding.

        Mixed precision (``enable_amp: True``, :mod:`pipeline.precision`; off by default): the
        training step's forward runs under bfloat16 autocast, and the weights, their gradients
        and Adam stay float32, on every path (PyTorch, fused Triton, the captured CUDA graph).

        - bfloat16: the products of in_proj, out_proj, the FFN's fc1 and fc2 and the item scores,
          and what they write and the next step reads: z, x, B, C, dt, the scan's output, the
          gated norm's output, the FFN's hidden layer, the block's and the FFN's outputs.
        - float32, where rounding to 8 bits would hurt: the embeddings and the residual stream
          (each dropout + residual + LayerNorm takes a product's bfloat16 output, sums and
          normalises in float32, and gives float32); the whole time branch (the gap at the first
          padded slot is about -1e9 s, and the LayerNorm over L must still tell apart real gaps
          thousands of times smaller; then the scale MLP, the convolutions, the gate, the next
          layer's signal); the step sizes times the time gate;
          inside the scan, dt + dt_bias, its softplus, the decays exp(A dt), their cumulative sums
          and the states (the PyTorch scan computes all of it in float32 from the bfloat16 x, B
          and C; mamba-ssm's kernel multiplies them on bfloat16 tensor cores with float32 sums,
          and up to its version 2.3.2 hands the states from chunk to chunk in bfloat16); the
          x/B/C convolution and its activation, the gated norm's statistics and the FFN's
          Hardswish + dropout, each computed in float32 and rounded once; the cross-entropy over
          the item scores. Evaluation runs without autocast, in float32.
    """

    defaults_file = ROOT / "config" / "model" / "TiM4Rec.yaml"  # any setting a Config lacks

    # On the CPU, a batch is packed where at most this share of its positions is real: above
    # it, the padded batch's faster convolution and one-chunk scan win (BENCHMARKS.md, History:
    # bench/cpu_packing.py).
    CPU_PACK_BELOW = 0.65

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        self.norm_eps = config["norm_eps"]
        self.is_time = config["is_time"]
        self.time_mask_padding = config["time_mask_padding"]
        self.is_kai_ming_init = config["is_kai_ming_init"]
        self.fused = config["fused"]
        self.last_position_only = config["last_position_only"]
        self.skip_padding = config["skip_padding"]
        self.pack_size = None  # slots of a packed batch on a GPU: set by fixed_pack_size
        for key in ("fused", "last_position_only", "skip_padding"):
            if not isinstance(config[key], bool):
                raise ValueError(f"{key} must be True or False, got {config[key]!r}")
        if config["loss_type"] != "CE":
            raise ValueError(f"TiM4Rec trains with loss_type CE only, got {config['loss_type']!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

        self.TIME_SEQ = config["TIME_FIELD"] + config["LIST_SUFFIX"]
        if self.is_time and self.TIME_SEQ not in dataset.field2type:
            raise ValueError(
                f"is_time needs the time field '{config['TIME_FIELD']}' loaded: add it to "
                f"load_col (inter), or set is_time: False")

        self.ssd_backend = resolve_backend(config["ssd_backend"], config["device"])
        logger.info("TiM4Rec SSD backend: %s (requested %s)", self.ssd_backend,
                    config["ssd_backend"])

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.dropout = nn.Dropout(self.dropout_prob)
        self.in_layer_norm = nn.LayerNorm(self.hidden_size, eps=self.norm_eps)
        if self.is_time:
            self.layer_norm_time = nn.LayerNorm(self.max_seq_length, eps=self.norm_eps)
        self.ssd_layers = nn.ModuleList(
            TiSSDLayer(
                self.hidden_size, self.dropout_prob, self.norm_eps,
                residual=self.num_layers > 1, is_ffn=config["is_ffn"],
                recompute=config["recompute"], max_seq_length=self.max_seq_length,
                d_state=config["d_state"], d_conv=config["d_conv"], expand=config["expand"],
                head_dim=config["head_dim"], chunk_size=config["chunk_size"], is_time=self.is_time,
                p2p_residual=config["p2p_residual"], time_drop_out=config["time_drop_out"],
                conv_activation=config["conv_activation"], backend=self.ssd_backend,
                fused=config["fused"],
            )
            for _ in range(self.num_layers)
        )
        self.nheads = self.ssd_layers[0].ssd.nheads
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, nn.Conv1d) and self.is_kai_ming_init:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                module.bias.data.zero_()

    @without_autocast  # in float32 under autocast: the gaps reach 1e9 s, bfloat16 keeps 3 digits
    def time_signal(self, timestamps, item_seq_len):
        """``tau = LayerNorm_L(Dropout(d))`` repeated over heads [B H L], from the times [B L]."""
        gaps = torch.diff(timestamps.float(), dim=1, prepend=timestamps[:, :1].float())  # [B L]
        if self.time_mask_padding:
            positions = torch.arange(gaps.shape[1], device=gaps.device)
            gaps = gaps.masked_fill(positions >= item_seq_len[:, None], 0.0)
        tau = self.layer_norm_time(self.dropout(gaps.to(self.item_embedding.weight.dtype)))
        return tau.unsqueeze(1).expand(-1, self.nheads, -1)  # [B H L]

    def encode(self, item_seq, item_seq_len, timestamps=None, at=None,
               packing: Packing | None = None):
        """The hidden state at every position [B L D], or with ``packing`` at every slot [1 S D];
        with ``at`` [B] (positions, or slots), at those only [B D] (the last layer then computes
        its position-wise part there alone)."""
        fused = self.fused and uses_triton(self.ssd_backend, item_seq)
        items = item_seq if packing is None else packing.pack(item_seq)  # [B L] or [1 S]
        h = dropout_add_layer_norm(embedding_lookup(self.item_embedding, items, fused), None,
                                   self.dropout, self.in_layer_norm, fused)  # [B L D] or [1 S D]
        tau = self.time_signal(timestamps, item_seq_len) if self.is_time else None  # [B H L]
        *layers, last = self.ssd_layers
        for layer in layers:
            h, tau = layer(h, tau, packing=packing)
        return last(h, tau, at, packing)[0]

    def packing(self, item_seq_len, seqlen: int) -> Packing | None:
        """How a batch's real positions are laid out (:class:`~ssd_ops.packing.Packing`), or None
        for the padded batch: without ``skip_padding``; on a GPU outside :meth:`fixed_pack_size`
        (the packing's size would be read from the GPU, and the host would wait for it); on the CPU,
        where more than ``CPU_PACK_BELOW`` of the batch's positions are real."""
        if not self.skip_padding:
            return None
        size = self.pack_size
        if size is None:  # exactly as many slots as real positions, read on the host
            if item_seq_len.is_cuda:
                return None
            size = int(item_seq_len.sum())
            if size > self.CPU_PACK_BELOW * item_seq_len.numel() * seqlen:
                return None  # on the CPU, a batch that is mostly real runs faster padded
        row_slots = Packing.row_slots_for(uses_triton(self.ssd_backend, item_seq_len), seqlen)
        return Packing.of(item_seq_len, seqlen, size, row_slots)

    def forward(self, item_seq, item_seq_len, timestamps=None):
        packing = self.packing(item_seq_len, item_seq.shape[1])
        # the last real position, the one that is scored: [B] positions, or slots
        at = item_seq_len - 1 if packing is None else packing.last
        if self.last_position_only:
            return self.encode(item_seq, item_seq_len, timestamps, at, packing)  # [B D]
        return at_positions(self.encode(item_seq, item_seq_len, timestamps, packing=packing), at)

    def pack_size_for(self, lengths, batch_size: int) -> int | None:
        """Slots for packing any batch of ``batch_size`` sequences drawn from those of ``lengths``
        [N] (the training samples'), or None where the model does not pack: their mean total
        plus 4 standard deviations (a normal total exceeds it once in about 30,000 batches), in
        steps of 256, at most ``batch_size * MAX_ITEM_LIST_LENGTH``."""
        if not self.skip_padding or len(lengths) == 0:
            return None
        lengths = lengths.double()
        spread = 4 * float(lengths.std(correction=0)) * math.sqrt(batch_size)
        size = 256 * math.ceil((batch_size * float(lengths.mean()) + spread) / 256)
        return min(size, batch_size * self.max_seq_length)

    def fits_pack_size(self, interaction, size: int) -> bool:
        """Whether a batch's real positions fit ``size`` slots (read on the host: from a batch on
        a GPU, after waiting for it)."""
        return int(interaction[self.ITEM_SEQ_LEN].sum()) <= size

    @contextlib.contextmanager
    def fixed_pack_size(self, size: int | None):
        """Inside: pack every batch, on a GPU too, into ``size`` slots (None: as outside), so that
        a GPU step has fixed shapes. Each batch must fit (:meth:`fits_pack_size`): that is not
        checked here, which would wait for the GPU."""
        saved, self.pack_size = self.pack_size, size
        try:
            yield
        finally:
            self.pack_size = saved

    def sequence_output(self, interaction):
        timestamps = interaction[self.TIME_SEQ] if self.is_time else None
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], timestamps)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load this project's or the authors' weights (same keys);
        see the class NOTE on is_time."""
        if not self.is_time:
            skipped = [k for k in state_dict if any(part in k for part in _TIME_ONLY)]
            if skipped:
                logger.info("is_time is off: skipping %d time-branch tensors", len(skipped))
                state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
