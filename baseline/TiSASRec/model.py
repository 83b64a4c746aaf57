r"""TiSASRec: time-interval-aware self-attention for sequential recommendation.

Reference:
    Jiacheng Li, Yujie Wang, Julian McAuley. "Time Interval Aware Self-Attention for Sequential
    Recommendation." WSDM 2020.

Each pair of input items (i, j) gets a relation r_ij, the clipped time interval between them, and
self-attention sees it through two learned tables, one for keys and one for values:

    e_ij = q_i . (k_j + r^K_ij + p^K_j) / sqrt(d)
    z_i  = sum_j softmax_j(e_ij) (v_j + r^V_ij + p^V_j)

with q_i, k_j, v_j the projected items and p^K_j, p^V_j absolute position embeddings (separate
tables for keys and values). A layer is ``q = LN(x); x = q + Attn(q, keys=x); x = LN(x);
x = x + FFN(x)``, as in the authors' code: the queries and the residual are normalised, the keys
and values are not. The item embedding is scaled by sqrt(D); embeddings (items, positions,
intervals) and the feed-forward outputs take dropout; padded slots are zeroed after every layer;
a final LayerNorm precedes the prediction, which scores every item by a dot product with the
(tied) item embedding.

NOTE:
    1. Intervals. The paper personalises intervals: r_ij = min(floor(|t_i - t_j| / r_min), k) with
       r_min the user's smallest non-zero interval and k = ``time_span``; this is the default,
       ``interval_mode: personalized``. The TiM4Rec authors' comparison used another variant,
       kept as ``interval_mode: raw``: r_ij = min(floor(|t_i - t_j|), k) on the raw times (on Unix
       seconds with k = 256, almost every pair of a real data set clips to k). The authors of
       TiSASRec round each rescaled timestamp rather than each interval; the two differ by at most
       one step before clipping.
    2. Where r_min comes from. A RecBole sample holds only its input prefix (``timestamp_list``,
       right-padded with 0) and each prefix of a user's history is a separate training sample.
       r_min is the smallest non-zero gap between consecutive real items of that input (1 when
       there is none, e.g. a one-item prefix). Padded slots never enter it, and neither does the
       target's time. Why: the model then depends on nothing but its input, so no held-out
       timestamp can leak (the TiSASRec authors scale by the whole history, valid and test
       interactions included), there is no per-user table to build from a particular split or to
       carry in checkpoints, and unseen users are handled. At evaluation the input is the whole
       history before the target, so r_min is the paper's per-user value up to the held-out item
       (and the ``MAX_ITEM_LIST_LENGTH`` window). The price: during training a short prefix may
       have a larger r_min than the full history, so one pair of items can get different
       relations in different prefixes.
    3. Positions count from the most recent item, as the authors' left-padded batches do: in a
       sequence of n items the j-th (0-based) item takes position ``MAX_ITEM_LIST_LENGTH - n + j``.
    4. Loss: cross-entropy over all items on the last position of each RecBole sample, as the
       TiM4Rec comparison trains it; the paper trains binary cross-entropy with one sampled
       negative at every position. ``loss_type: BPR`` is available. Initialisation follows RecBole
       (normal, std ``initializer_range``), not TensorFlow's Glorot default.
    5. Memory. In training the per-pair interval embeddings [B, L, L, D] are built, because the
       authors drop out each of their elements; in evaluation (no dropout) an exact factored form
       gathers q . r^K from a [B, H, L, k + 1] product and scatters the attention weights into
       interval bins, so full ranking on long sequences fits in memory. Training at L = 200 needs
       small batches (the TiM4Rec authors used 256).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from pipeline import compat
from pipeline.scoring import ItemScoring, take_settings

compat.apply()  # RecBole 1.2.1 on numpy 2 and pandas 3, in RecBole's own flow too

INTERVAL_MODES = ("personalized", "raw")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def interval_matrix(
    timestamps: torch.Tensor, lengths: torch.Tensor, time_span: int, mode: str = "personalized"
) -> torch.Tensor:
    """The clipped time-interval relation r[b, i, j] between the i-th and j-th items of each row.

    ``personalized`` (the paper): ``min(floor(|t_i - t_j| / r_min), time_span)`` where ``r_min`` is
    the row's smallest non-zero gap between consecutive real items (1 if there is none).
    ``raw`` (the TiM4Rec authors' variant): ``min(floor(|t_i - t_j|), time_span)`` in the data's
    time unit. Pairs that involve a padded slot are 0.

    Args:
        timestamps: [B, L] float, each row ascending and right-padded (any values past ``lengths``).
        lengths: [B] number of real items per row.
        time_span: k, the largest relation.
        mode: ``"personalized"`` or ``"raw"``.

    Returns:
        LongTensor [B, L, L] with values in [0, time_span].
    """
    if mode not in INTERVAL_MODES:
        raise ValueError(f"interval mode must be one of {INTERVAL_MODES}, got {mode!r}")
    # RecBole stores times as float32; their differences are exact, the quotients want float64.
    t = timestamps.to(torch.float64)  # [B L]
    real = torch.arange(t.size(1), device=t.device) < lengths.unsqueeze(1)  # [B L]
    gaps = (t.unsqueeze(2) - t.unsqueeze(1)).abs()  # [B L L]
    if mode == "personalized":
        gaps = gaps / smallest_gap(t, real).view(-1, 1, 1)
    relation = gaps.floor().clamp(max=time_span).long()  # clamp first: raw seconds overflow nothing
    pair_is_real = real.unsqueeze(2) & real.unsqueeze(1)  # [B L L]
    return relation.masked_fill(~pair_is_real, 0)


def smallest_gap(timestamps: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest non-zero gap between consecutive real items; 1 where there is none.

    Args:
        timestamps: [B, L] float. real: [B, L] bool, True on the real (leading) slots.

    Returns:
        [B], same dtype as ``timestamps``.
    """
    steps = (timestamps[:, 1:] - timestamps[:, :-1]).abs()  # [B L-1]
    valid = real[:, 1:] & (steps > 0)  # both ends real (real slots lead) and a true gap
    steps = steps.masked_fill(~valid, math.inf)
    # A column of inf keeps the reduction defined for L = 1.
    steps = torch.cat([steps, steps.new_full((steps.size(0), 1), math.inf)], dim=1)
    smallest = steps.amin(dim=1)  # [B]
    return torch.where(torch.isinf(smallest), torch.ones_like(smallest), smallest)


class TimeIntervalAttention(nn.Module):
    """Multi-head self-attention with absolute-position and time-interval terms in keys, values."""

    def __init__(self, hidden_size: int, n_heads: int, attn_dropout_prob: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_size = hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(attn_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_size).transpose(1, 2)  # [B H L d]

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        position_key: torch.Tensor,
        position_value: torch.Tensor,
        intervals: torch.Tensor,
        interval_key: torch.Tensor,
        interval_value: torch.Tensor,
        attend: torch.Tensor,
    ) -> torch.Tensor:
        """Attend from ``queries`` [B L D] over ``keys`` [B L D].

        ``position_key``/``position_value`` are [B L D]. ``intervals`` [B L L] holds the relation
        ids. ``interval_key``/``interval_value`` are either the embedding tables [k+1, D] (exact
        factored form) or per-pair embeddings [B L L D] (needed when they carry dropout).
        ``attend`` [B 1 L L] is True where query i may see key j.
        """
        batch, length, hidden = queries.shape
        q = self._heads(self.query(queries))  # [B H L d]
        k = self._heads(self.key(keys) + position_key)  # [B H L d]
        v = self._heads(self.value(keys) + position_value)  # [B H L d]

        per_pair = interval_key.dim() == 4
        if per_pair:
            rel_key = interval_key.view(batch, length, length, self.n_heads, self.head_size)
            rel_scores = torch.einsum("bhid,bijhd->bhij", q, rel_key)  # [B H L L]
        else:
            table_key = interval_key.view(-1, self.n_heads, self.head_size)  # [k+1 H d]
            per_bin = torch.einsum("bhid,khd->bhik", q, table_key)  # [B H L k+1]
            index = intervals.unsqueeze(1).expand(-1, self.n_heads, -1, -1)  # [B H L L]
            rel_scores = per_bin.gather(-1, index)  # [B H L L]

        scores = (q @ k.transpose(-1, -2) + rel_scores) / math.sqrt(self.head_size)  # [B H L L]
        # A finite fill keeps a row without visible keys finite (RecBole never builds one).
        scores = scores.masked_fill(~attend, torch.finfo(scores.dtype).min)
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))  # [B H L L]

        out = probs @ v  # [B H L d]
        if per_pair:
            rel_value = interval_value.view(batch, length, length, self.n_heads, self.head_size)
            out = out + torch.einsum("bhij,bijhd->bhid", probs, rel_value)
        else:
            # sum_j p_ij r^V_{r_ij} = sum_bins (sum of p_ij over j in the bin) r^V_bin
            bins = probs.new_zeros(probs.shape[:-1] + (interval_value.size(0),))  # [B H L k+1]
            bins = bins.scatter_add(-1, index, probs)
            table_value = interval_value.view(-1, self.n_heads, self.head_size)  # [k+1 H d]
            out = out + torch.einsum("bhik,khd->bhid", bins, table_value)
        return out.transpose(1, 2).reshape(batch, length, hidden)  # [B L D]


class PointWiseFeedForward(nn.Module):
    """Dropout(W2 Dropout(act(W1 x))); the residual is added by the layer."""

    def __init__(self, hidden_size: int, inner_size: int, dropout_prob: float, activation: str):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, inner_size),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout_prob),
            nn.Linear(inner_size, hidden_size),
            nn.Dropout(dropout_prob),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TiSASRecLayer(nn.Module):
    def __init__(
        self, hidden_size, n_heads, inner_size, hidden_dropout_prob, attn_dropout_prob, eps, act
    ):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.attention = TimeIntervalAttention(hidden_size, n_heads, attn_dropout_prob)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.ffn = PointWiseFeedForward(hidden_size, inner_size, hidden_dropout_prob, act)

    def forward(
        self, x, attend, position_key, position_value, intervals, interval_key, interval_value
    ):
        queries = self.attn_norm(x)  # [B L D]
        # Keys and values read the un-normalised input, the residual the normalised queries: as
        # the authors' code (it differs from a plain pre-LN transformer).
        x = queries + self.attention(
            queries,
            x,
            position_key,
            position_value,
            intervals,
            interval_key,
            interval_value,
            attend,
        )
        x = self.ffn_norm(x)
        return x + self.ffn(x)  # [B L D]


class TiSASRec(ItemScoring, SequentialRecommender):
    r"""Time-interval-aware self-attention (Li et al., WSDM 2020); see the module docstring."""

    defaults_file = Path(__file__).with_name("config.yaml")  # any setting a Config lacks

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        take_settings(self, config, "hidden_size", "inner_size", "n_layers", "n_heads",
                      "hidden_dropout_prob", "attn_dropout_prob", "hidden_act", "layer_norm_eps",
                      "initializer_range", "time_span", "interval_mode", "loss_type")
        self.TIME_SEQ = config["TIME_FIELD"] + config["LIST_SUFFIX"]
        self._check_config(dataset)

        size, length = self.hidden_size, self.max_seq_length
        self.item_embedding = nn.Embedding(self.n_items, size, padding_idx=0)
        self.position_key_embedding = nn.Embedding(length, size)
        self.position_value_embedding = nn.Embedding(length, size)
        self.interval_key_embedding = nn.Embedding(self.time_span + 1, size)
        self.interval_value_embedding = nn.Embedding(self.time_span + 1, size)
        self.emb_dropout = nn.Dropout(self.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            TiSASRecLayer(
                size,
                self.n_heads,
                self.inner_size,
                self.hidden_dropout_prob,
                self.attn_dropout_prob,
                self.layer_norm_eps,
                self.hidden_act,
            )
            for _ in range(self.n_layers)
        )
        self.final_norm = nn.LayerNorm(size, eps=self.layer_norm_eps)
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    def _check_config(self, dataset) -> None:
        if self.n_heads < 1 or self.hidden_size % self.n_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of n_heads ({self.n_heads})"
            )
        if not isinstance(self.time_span, int) or self.time_span < 1:
            raise ValueError(f"time_span must be a positive integer, got {self.time_span!r}")
        if self.interval_mode not in INTERVAL_MODES:
            raise ValueError(
                f"interval_mode must be one of {INTERVAL_MODES}, got {self.interval_mode!r}"
            )
        if self.loss_type not in ("CE", "BPR"):
            raise ValueError(f"loss_type must be 'CE' or 'BPR', got {self.loss_type!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        if self.TIME_SEQ not in dataset.field2type:
            raise ValueError(
                f"TiSASRec reads interaction times but the dataset has no '{self.TIME_SEQ}' field: "
                "load the time field (e.g. load_col: {inter: [user_id, item_id, timestamp]})"
            )

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def _recent_first_positions(
        self, real: torch.Tensor, item_seq_len: torch.Tensor
    ) -> torch.Tensor:
        """Position ids of a left-padded batch: the last real item always sits at max_len - 1."""
        slots = torch.arange(real.size(1), device=real.device)  # [L]
        positions = slots + (self.max_seq_length - item_seq_len).unsqueeze(1)  # [B L]
        return positions.masked_fill(~real, 0)

    def encode(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states of every slot, [B L D] (padded slots are meaningless)."""
        length = item_seq.size(1)
        if length > self.max_seq_length:
            raise ValueError(
                f"sequence length {length} exceeds MAX_ITEM_LIST_LENGTH {self.max_seq_length}"
            )
        real = torch.arange(length, device=item_seq.device) < item_seq_len.unsqueeze(1)  # [B L]
        keep = real.unsqueeze(-1).to(self.item_embedding.weight.dtype)  # [B L 1]

        x = self.item_embedding(item_seq) * math.sqrt(self.hidden_size)  # [B L D]
        x = self.emb_dropout(x) * keep
        positions = self._recent_first_positions(real, item_seq_len)  # [B L]
        position_key = self.emb_dropout(self.position_key_embedding(positions))  # [B L D]
        position_value = self.emb_dropout(self.position_value_embedding(positions))  # [B L D]

        mode, span = self.interval_mode, self.time_span
        intervals = interval_matrix(timestamps, item_seq_len, span, mode)  # [B L L]
        if self.training and self.emb_dropout.p > 0:
            # Dropout on each pair's embedding, as the authors do, needs them materialised.
            interval_key = self.emb_dropout(self.interval_key_embedding(intervals))  # [B L L D]
            interval_value = self.emb_dropout(self.interval_value_embedding(intervals))  # [B L L D]
        else:
            interval_key = self.interval_key_embedding.weight  # [k+1 D]
            interval_value = self.interval_value_embedding.weight  # [k+1 D]

        # Causal, over real keys (with right padding every padded key is in the future anyway).
        causal = torch.ones(length, length, dtype=torch.bool, device=item_seq.device).tril()
        attend = (causal & real.unsqueeze(1)).unsqueeze(1)  # [B 1 L L]
        for layer in self.layers:
            x = layer(
                x, attend, position_key, position_value, intervals, interval_key, interval_value
            )
            x = x * keep
        return self.final_norm(x)  # [B L D]

    def forward(self, item_seq, item_seq_len, timestamps):
        hidden = self.encode(item_seq, item_seq_len, timestamps)  # [B L D]
        return self.gather_indexes(hidden, item_seq_len - 1)  # [B D]

    def sequence_output(self, interaction):
        return self.forward(
            interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.TIME_SEQ]
        )
