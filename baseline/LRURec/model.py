r"""LRURec: linear recurrent units for sequential recommendation.

Reference:
    Zhenrui Yue, Yueqi Wang, Zhankui He, Huimin Zeng, Julian McAuley, Dong Wang. "Linear Recurrent
    Units for Sequential Recommendation." WSDM 2024, pp. 930-938 (arXiv:2310.02367).
    The LRU itself: Antonio Orvieto et al. "Resurrecting Recurrent Neural Networks for Long
    Sequences." ICML 2023.

Embedding: ``LN(Dropout(E[item]))``. Each of ``n_layers`` blocks is an LRU layer followed by a
position-wise feed-forward network:

    h_t = lambda * h_{t-1} + gamma * (B x_t + b)          (diagonal, complex, 2D states)
    x  <- LN(Dropout(Re(C h_t + c)) + x)
    x  <- LN(Dropout(W2 Dropout(GELU(W1 x))) + x)         (W1: D -> 4D)

with ``lambda = exp(-exp(nu_log) + i exp(theta_log))`` and the normaliser
``gamma = exp(gamma_log)``. The eigenvalues start uniformly on the ring
``r_min <= |lambda| <= r_max`` (0.8 and 0.99) with phases in [0, 2 pi), and
``gamma_log = log sqrt(1 - |lambda|^2)``; all three are learned. The recurrence runs as a
parallel scan of ``ceil(log2 L)`` steps (:func:`lru_parallel_scan`). Sequences are left-padded,
as LRURec's own batches are, and the score of item i is ``<x_last, E_i> + bias_i``: tied
embeddings plus a learned item bias. Every weight except LayerNorms and the eigenvalue/normaliser
parameters starts from a normal of std 0.02 truncated at +-0.04, biases included, as in the
authors' code.

NOTE:
    1. Padding. The authors' scan drops the state carried out of a padded slot; with left padding
       that is exactly a zero input at every padded slot, which is what this implementation feeds
       the scan, so the state at every real slot sums over real items only and the authors'
       padding of L up to a power of two is not needed (the scan here takes any L).
    2. Complex projections are held as real ones of the same law: ``in_proj`` gives Re and Im of
       ``B x + b`` ([D -> 2 * 2D]); ``out_proj`` maps ``[Re h, Im h]`` to ``Re(C h + c)``
       ([2 * 2D -> D]), which drops only the authors' unused imaginary output bias. This keeps
       every parameter real (optimisers, AMP, DDP and checkpoints need no complex support); the
       scan itself runs in complex float32 or wider.
    3. Training: RecBole makes one sample per prefix and computes cross-entropy at its last
       position; the authors compute it at every position of the whole sequence at once.
       ``loss_type: BPR`` is available.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from pipeline import compat
from pipeline.scoring import ItemScoring, take_settings

compat.apply()  # RecBole 1.2.1 on numpy 2 and pandas 3, in RecBole's own flow too


def lru_parallel_scan(lam: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """All states of ``h_t = lam * h_{t-1} + inputs_t`` (``h_{-1} = 0``) in ceil(log2 L) steps.

    Hillis-Steele doubling: after the step with offset ``s``, ``h_t`` holds the sum of
    ``lam^(t-u) inputs_u`` over the last ``2 s`` inputs ``u <= t``, for any length L.

    Args:
        lam: [N] (complex) diagonal of the transition.
        inputs: [..., L, N] (complex) already projected inputs.

    Returns:
        [..., L, N] states, same dtype as ``inputs``.
    """
    length = inputs.size(-2)
    states = inputs
    power = lam  # lam ** offset
    offset = 1
    while offset < length:
        head = torch.zeros_like(states[..., :offset, :])  # nothing carries into the first slots
        carried = torch.cat([head, states[..., : length - offset, :]], dim=-2)
        states = states + power * carried
        power = power * power
        offset *= 2
    return states


def ring_init(n_states: int, r_min: float, r_max: float, max_phase: float = 2 * math.pi):
    """Log-parameters of eigenvalues uniform on the ring r_min <= |lambda| <= r_max (Orvieto et al).

    Returns ``nu_log, theta_log, gamma_log``, each [n_states], with
    ``lambda = exp(-exp(nu_log) + i exp(theta_log))`` and ``exp(gamma_log) = sqrt(1 - |lambda|^2)``.
    """
    u1 = torch.rand(n_states)
    u2 = torch.rand(n_states)
    # |lambda|^2 uniform in [r_min^2, r_max^2] gives a uniform density over the ring's area.
    nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
    theta_log = torch.log(max_phase * u2)
    modulus = torch.exp(-torch.exp(nu_log))
    gamma_log = torch.log(torch.sqrt(1 - modulus**2))
    return nu_log, theta_log, gamma_log


class LRULayer(nn.Module):
    """One LRU with residual, dropout and LayerNorm: ``LN(Dropout(Re(C h + c)) + x)``."""

    def __init__(
        self, hidden_size: int, dropout_prob: float, r_min: float, r_max: float, eps: float
    ):
        super().__init__()
        self.n_states = 2 * hidden_size
        self.in_proj = nn.Linear(hidden_size, 2 * self.n_states)  # Re and Im of B x + b
        self.out_proj = nn.Linear(2 * self.n_states, hidden_size)  # [Re h, Im h] -> Re(C h + c)
        nu_log, theta_log, gamma_log = ring_init(self.n_states, r_min, r_max)
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(gamma_log)
        self.dropout = nn.Dropout(dropout_prob)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def eigenvalues(self) -> torch.Tensor:
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))  # [N]

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x: [B L D] left-padded; real: [B L] bool. Returns [B L D]."""
        projected = self.in_proj(x)
        # Half-precision complex is barely supported: the scan runs in float32 or wider.
        projected = projected.to(torch.promote_types(projected.dtype, torch.float32))
        re, im = projected.chunk(2, dim=-1)  # [B L N] each
        inputs = torch.complex(re, im) * torch.exp(self.gamma_log)  # [B L N]
        inputs = inputs * real.unsqueeze(-1)  # the state starts at the first real item (NOTE 1)
        states = lru_parallel_scan(self.eigenvalues(), inputs)  # [B L N]
        out = self.out_proj(torch.cat([states.real, states.imag], dim=-1).to(x.dtype))  # [B L D]
        return self.layer_norm(self.dropout(out) + x)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int, dropout_prob: float, eps: float):
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, inner_size)
        self.w_2 = nn.Linear(inner_size, hidden_size)
        self.dropout = nn.Dropout(dropout_prob)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.dropout(F.gelu(self.w_1(x)))  # [B L 4D]
        return self.layer_norm(self.dropout(self.w_2(inner)) + x)  # [B L D]


class LRUBlock(nn.Module):
    def __init__(self, hidden_size, dropout_prob, r_min, r_max, eps):
        super().__init__()
        self.lru = LRULayer(hidden_size, dropout_prob, r_min, r_max, eps)
        self.feed_forward = PositionwiseFeedForward(hidden_size, 4 * hidden_size, dropout_prob, eps)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.lru(x, real))


def to_left_padding(item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """Move each right-padded row's items to its end: ``[a b c 0 0] -> [0 0 a b c]``."""
    length = item_seq.size(1)
    slots = torch.arange(length, device=item_seq.device)
    source = (slots - (length - item_seq_len).unsqueeze(1)) % length  # [B L]; pads map onto pads
    return item_seq.gather(1, source)


class LRURec(ItemScoring, SequentialRecommender):
    r"""Linear recurrent units for sequential recommendation; see the module docstring."""

    defaults_file = Path(__file__).with_name("config.yaml")  # any setting a Config lacks

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        take_settings(self, config, "hidden_size", "n_layers", "dropout_prob", "r_min", "r_max",
                      "layer_norm_eps", "initializer_range", "loss_type")
        self._check_config()

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size)
        self.emb_dropout = nn.Dropout(self.dropout_prob)
        self.emb_layer_norm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.blocks = nn.ModuleList(
            LRUBlock(
                self.hidden_size, self.dropout_prob, self.r_min, self.r_max, self.layer_norm_eps
            )
            for _ in range(self.n_layers)
        )
        self.item_bias = nn.Parameter(torch.zeros(self.n_items))
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()
        self._init_weights()

    def _check_config(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if not 0 < self.r_min < self.r_max < 1:
            raise ValueError(
                f"need 0 < r_min < r_max < 1 for a stable LRU, "
                f"got r_min={self.r_min}, r_max={self.r_max}"
            )
        if self.loss_type not in ("CE", "BPR"):
            raise ValueError(f"loss_type must be 'CE' or 'BPR', got {self.loss_type!r}")

    def _init_weights(self) -> None:
        """Truncated normal (std ``initializer_range``, cut at 2 std) on every parameter except
        LayerNorms and the LRU's eigenvalue/normaliser parameters, as LRURec's authors do."""
        std = self.initializer_range
        keep = set()
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                keep.update(id(p) for p in module.parameters())
            elif isinstance(module, LRULayer):
                keep.update(id(p) for p in (module.nu_log, module.theta_log, module.gamma_log))
        with torch.no_grad():
            for param in self.parameters():
                if id(param) not in keep:
                    nn.init.trunc_normal_(param, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def encode(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Hidden states of the left-padded batch, [B L D]; the last slot is the newest item."""
        item_seq = to_left_padding(item_seq, item_seq_len)  # [B L]
        slots = torch.arange(item_seq.size(1), device=item_seq.device)
        real = slots >= (item_seq.size(1) - item_seq_len).unsqueeze(1)  # [B L]
        x = self.emb_layer_norm(self.emb_dropout(self.item_embedding(item_seq)))  # [B L D]
        for block in self.blocks:
            x = block(x, real)
        return x

    def forward(self, item_seq, item_seq_len):
        return self.encode(item_seq, item_seq_len)[:, -1]  # [B D]
