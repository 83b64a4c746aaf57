r"""SSD4Rec: structured state space duality (Mamba-2) for sequential recommendation.

Reference:
    Haohao Qu, Yifeng Zhang, Liangbo Ning, Wenqi Fan, Qing Li. "SSD4Rec: A Structured State Space
    Duality Model for Efficient Sequential Recommendation." arXiv:2409.01192, 2024.

Two designs, chosen by ``bidirectional``:

``bidirectional: True`` (default): the paper's Bi-SSD layer. A forward and a backward Mamba-2 SSD
block (separate weights) read the sequence; their outputs are summed and
``h <- LN(Dropout(fwd(h) + bwd(h)) + h)``, then ``h <- LN(Dropout(W2 Dropout(GELU(W1 h))) + h)``
(W1: D -> 4D). The SSD block is Mamba-2's (mamba-ssm ``Mamba2`` defaults: projections without
bias, causal depthwise convolution and SiLU on x, B, C, one B/C group, ``y = RMSNorm(y * silu(z))``
with eps 1e-5), its scan :func:`ssd.chunk_scan`.
The paper packs the variable-length sequences of a batch into one sequence with register tokens
that keep users apart. With RecBole's right-padded batches the same isolation is exact per row:
the forward block is causal, so padding (which follows the real items) never reaches a real
position; the backward block runs over each sequence reversed *within its real length*
(``[a b c 0 0] -> [c b a 0 0]``), so the padding again trails the real items, and its output is
reversed back. The output at a real position depends on the real items only, whatever the padded
slots hold.

``bidirectional: False``: the one-direction stand-in the TiM4Rec authors compared against
(``SSD4Rec_r``), i.e. TiM4Rec without its time path: each layer is TiM4Rec's own
``TiSSDLayer`` with ``is_time=False`` (Hardswish after the convolution, biased projections, gated
RMSNorm with ``norm_eps``, ``LN(Dropout(ssd(h)) + h)`` without the residual for a single layer, and
a Hardswish feed-forward network). Its parameter names are TiM4Rec's.

Both: ``h = LN(Dropout(E[item]))`` (eps ``norm_eps``), output at the last real position, scores by
dot product with every item embedding (tied), cross-entropy over all items.

NOTE:
    1. Not reproduced from the paper: the Bernoulli masking of input items in training
       (``maskratio``/``beta`` in the authors' configuration) and the register tokens themselves
       (replaced by the exact per-row isolation above); the authors also switch the embedding
       LayerNorm off on the Amazon sets (``norm_embedding``), which is always on here.
       These details are not described fully enough in the paper to reproduce faithfully.
    2. Defaults follow the TiM4Rec comparison's 64d setting (d_state 32, 2 layers, dropout 0.2)
       with the authors' head dimension 16; the TiM4Rec authors' stand-in used head_dim 32.
    3. With RecBole every prefix is a training sample, so the backward block sees the items of
       that prefix only: it never sees the target.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from pipeline import compat
from pipeline.scoring import ItemScoring, take_settings
from ssd import TimeAwareSSD
from ssd_ops.backend import resolve_backend
from tim4rec import TiSSDLayer

compat.apply()  # RecBole 1.2.1 on numpy 2 and pandas 3, in RecBole's own flow too

logger = logging.getLogger()  # RecBole logs through the root logger


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``lengths[b]`` slots of each row of ``x`` [B, L, ...]; padded slots stay.

    ``[a b c 0 0] -> [c b a 0 0]``. The map is its own inverse.
    """
    batch, length = x.shape[:2]
    slots = torch.arange(length, device=x.device)  # [L]
    last = (lengths - 1).unsqueeze(1)  # [B 1]
    index = torch.where(slots < lengths.unsqueeze(1), last - slots, slots)  # [B L]
    index = index.view(batch, length, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class Mamba2Mixer(TimeAwareSSD):
    """Mamba-2's SSD block, [B L D] -> [B L D], with mamba-ssm ``Mamba2``'s defaults and names.

    :class:`ssd.TimeAwareSSD` without time, with SiLU after the convolution, projections without
    bias and the gated RMSNorm's eps 1e-5: ``in_proj`` splits into z, xBC, dt; xBC takes a causal
    depthwise convolution and SiLU; the SSD scan runs per head with ``A = -exp(A_log)``, step
    ``softplus(dt + dt_bias)`` and skip ``D``; then ``out_proj(RMSNorm(y * silu(z)))``.
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, head_dim: int,
                 chunk_size: int, backend: str):
        super().__init__(d_model, max_seq_length=0, d_state=d_state, d_conv=d_conv, expand=expand,
                         head_dim=head_dim, chunk_size=chunk_size, norm_eps=1e-5, is_time=False,
                         conv_activation="silu", bias=False, backend=backend)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # [B L D] -> [B L D]
        return super().forward(u)[0]


class FeedForward(nn.Module):
    def __init__(self, d_model: int, dropout_prob: float, eps: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, 4 * d_model)
        self.w_2 = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.dropout(nn.functional.gelu(self.w_1(x)))  # [B L 4D]
        return self.layer_norm(self.dropout(self.w_2(inner)) + x)  # [B L D]


class BiSSDLayer(nn.Module):
    """``LN(Dropout(fwd(h) + bwd(h)) + h)``, then the feed-forward network (module docstring)."""

    def __init__(self, d_model: int, dropout_prob: float, norm_eps: float, **mixer_kwargs):
        super().__init__()
        self.forward_ssd = Mamba2Mixer(d_model, **mixer_kwargs)
        self.backward_ssd = Mamba2Mixer(d_model, **mixer_kwargs)
        self.dropout = nn.Dropout(dropout_prob)
        self.layer_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = FeedForward(d_model, dropout_prob, norm_eps)

    def backward_direction(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The backward block's output: position t sees the real items t, t+1, ..., len-1."""
        return reverse_within_length(self.backward_ssd(reverse_within_length(x, lengths)), lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mixed = self.forward_ssd(x) + self.backward_direction(x, lengths)  # [B L D]
        return self.ffn(self.layer_norm(self.dropout(mixed) + x))


class SSD4Rec(ItemScoring, SequentialRecommender):
    r"""Bidirectional SSD (Mamba-2) recommender (Qu et al., 2024); see the module docstring."""

    defaults_file = Path(__file__).with_name("config.yaml")  # any setting a Config lacks

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        take_settings(self, config, "hidden_size", "num_layers", "dropout_prob", "norm_eps",
                      "bidirectional")
        self._check_config(config)
        self.ssd_backend = resolve_backend(config["ssd_backend"], self.device)
        logger.info(
            "SSD4Rec: %s design, SSD backend '%s'.",
            "bidirectional" if self.bidirectional else "one-direction (TiM4Rec without time)",
            self.ssd_backend,
        )

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.dropout = nn.Dropout(self.dropout_prob)
        self.in_layer_norm = nn.LayerNorm(self.hidden_size, eps=self.norm_eps)
        mixer = dict(
            d_state=config["d_state"],
            d_conv=config["d_conv"],
            expand=config["expand"],
            head_dim=config["head_dim"],
            chunk_size=config["chunk_size"],
            backend=self.ssd_backend,
        )
        if self.bidirectional:
            layers = (
                BiSSDLayer(self.hidden_size, self.dropout_prob, self.norm_eps, **mixer)
                for _ in range(self.num_layers)
            )
        else:
            layers = (
                TiSSDLayer(
                    self.hidden_size,
                    self.dropout_prob,
                    self.norm_eps,
                    residual=self.num_layers > 1,
                    is_ffn=True,
                    max_seq_length=self.max_seq_length,
                    is_time=False,
                    conv_activation="hardswish",
                    **mixer,
                )
                for _ in range(self.num_layers)
            )
        self.ssd_layers = nn.ModuleList(layers)
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    def _check_config(self, config) -> None:
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"bidirectional must be True or False, got {self.bidirectional!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        chunk = config["chunk_size"]
        if not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk_size must be a power of two, got {chunk!r}")
        if config["loss_type"] != "CE":
            raise ValueError(f"SSD4Rec trains with loss_type CE only, got {config['loss_type']!r}")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Linear/Embedding/LayerNorm as RecBole's models; the SSD's dt_bias, A_log and D keep
        # their own initialisation, the convolutions PyTorch's.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def encode(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Hidden states of every slot, [B L D]; real slots never depend on the padded ones."""
        h = self.in_layer_norm(self.dropout(self.item_embedding(item_seq)))  # [B L D]
        for layer in self.ssd_layers:
            h = layer(h, item_seq_len) if self.bidirectional else layer(h)[0]
        return h

    def forward(self, item_seq, item_seq_len):
        return self.gather_indexes(self.encode(item_seq, item_seq_len), item_seq_len - 1)  # [B D]
