r"""Mamba4Rec: sequential recommendation with selective state space models (Mamba-1).

Reference:
    Chengkai Liu, Jianghao Lin, Jianling Wang, Hanzhou Liu, James Caverlee. "Mamba4Rec: Towards
    Efficient Sequential Recommendation with Selective State Space Models." arXiv:2403.03900, 2024.

Embedding ``LN(Dropout(E[item]))``; each of ``num_layers`` layers is a Mamba-1 block followed by a
position-wise feed-forward network:

    h <- LN(Dropout(Mamba(h)) + h)          (no residual when num_layers == 1, as the authors do)
    h <- LN(Dropout(W2 Dropout(GELU(W1 h))) + h)          (W1: D -> 4D)

All LayerNorms use eps 1e-12. The output is the hidden state at the last real position, scored
against every item embedding (tied). Right padding is harmless: the Mamba block is causal.

Backends (``mamba_backend``), chosen once at construction and logged:
    ``cuda``  mamba-ssm's ``Mamba`` with its compiled selective scan; CUDA only.
    ``torch`` mambapy's ``MambaBlock`` (pure PyTorch, parallel scan); any device.
    ``auto``  ``cuda`` when the model's device is CUDA and ``from mamba_ssm import Mamba`` works,
              otherwise ``torch`` with a logged warning that says why.
Both blocks hold the same parameters under the same state_dict keys (``in_proj.weight``,
``conv1d.{weight,bias}``, ``x_proj.weight``, ``dt_proj.{weight,bias}``, ``A_log``, ``D``,
``out_proj.weight``) and compute the same function, so a checkpoint from one loads in the other.

NOTE:
    1. As in the authors' code, the model-wide initialisation (normal(0, 0.02) for every Linear and
       Embedding weight, zero Linear biases) runs after the Mamba blocks are built, so it also
       overrides Mamba's own ``dt_proj`` initialisation (its bias, the inverse-softplus of a
       log-uniform step, becomes 0). ``A_log``, ``D`` and the convolution keep Mamba's init.
    2. The ``torch`` backend materialises [B, L, 2D, d_state] scan tensors (about 1.7 GB each for
       B 2048, L 50, D 64, d_state 32; a training step there peaked at about 25 GiB on one GPU):
       without mamba-ssm's compiled kernels, use smaller batches for long sequences.
"""

from __future__ import annotations

import logging

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from pipeline.scoring import ItemScoring

MAMBA_BACKENDS = ("auto", "cuda", "torch")

logger = logging.getLogger()  # RecBole logs through the root logger


def cuda_backend_problem(device) -> str | None:
    """Why mamba-ssm's compiled Mamba cannot run for ``device``; None when it can."""
    if torch.device(device).type != "cuda":
        return f"the model runs on '{device}' and mamba-ssm's selective scan needs CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from mamba_ssm import Mamba  # noqa: F401  (heavy: compiled extension, imported on demand)
    except (ImportError, OSError) as err:  # missing package, or a build without selective_scan_cuda
        return f"mamba-ssm's compiled Mamba cannot be imported ({type(err).__name__}: {err})"
    return None


def select_backend(requested: str, device) -> str:
    """Resolve ``mamba_backend`` to ``cuda`` or ``torch``; ``auto`` never falls back silently."""
    if requested not in MAMBA_BACKENDS:
        raise ValueError(f"mamba_backend must be one of {MAMBA_BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    problem = cuda_backend_problem(device)
    if problem is None:
        return "cuda"
    if requested == "cuda":
        raise RuntimeError(f"mamba_backend 'cuda' was requested but {problem}")
    logger.warning(
        "Mamba4Rec: %s; falling back to the pure-PyTorch selective scan (mambapy).", problem
    )
    return "torch"


def build_mamba_block(
    backend: str, d_model: int, d_state: int, d_conv: int, expand: int
) -> nn.Module:
    """A Mamba-1 mixer [B L D] -> [B L D] with mamba-ssm's parameter names."""
    if backend == "cuda":
        from mamba_ssm import Mamba

        return Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    try:
        from mambapy.mamba import MambaBlock, MambaConfig
    except ImportError as err:
        raise ImportError(
            "Mamba4Rec's torch backend needs mambapy: pip install mambapy==1.2.0"
        ) from err
    # n_layers is unused by a single MambaBlock; pscan selects the parallel (not sequential) scan.
    config = MambaConfig(
        d_model=d_model,
        n_layers=1,
        d_state=d_state,
        expand_factor=expand,
        d_conv=d_conv,
        pscan=True,
    )
    return MambaBlock(config)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, inner_size: int, dropout_prob: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout_prob)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.dropout(self.activation(self.w_1(x)))  # [B L 4D]
        return self.LayerNorm(self.dropout(self.w_2(inner)) + x)  # [B L D]


class MambaLayer(nn.Module):
    def __init__(self, mamba: nn.Module, d_model: int, dropout_prob: float, residual: bool):
        super().__init__()
        self.mamba = mamba
        self.residual = residual
        self.dropout = nn.Dropout(dropout_prob)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.mamba(x))  # [B L D]
        hidden = self.LayerNorm(hidden + x if self.residual else hidden)
        return self.ffn(hidden)


class Mamba4Rec(ItemScoring, SequentialRecommender):
    r"""Mamba-1 blocks with feed-forward layers (Liu et al., 2024); see the module docstring."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        self.d_state = config["d_state"]
        self.d_conv = config["d_conv"]
        self.expand = config["expand"]
        self.loss_type = config["loss_type"]
        self._check_config()
        self.backend = select_backend(config["mamba_backend"], self.device)
        logger.info("Mamba4Rec: Mamba-1 blocks run on the '%s' backend.", self.backend)

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(self.dropout_prob)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(
                build_mamba_block(
                    self.backend, self.hidden_size, self.d_state, self.d_conv, self.expand
                ),
                self.hidden_size,
                self.dropout_prob,
                residual=self.num_layers > 1,
            )
            for _ in range(self.num_layers)
        )
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()
        self.apply(self._init_weights)  # after the blocks on purpose: NOTE 1

    def _check_config(self) -> None:
        for key in ("hidden_size", "num_layers", "d_state", "d_conv", "expand"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.loss_type not in ("CE", "BPR"):
            raise ValueError(f"loss_type must be 'CE' or 'BPR', got {self.loss_type!r}")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Hidden states of every slot, [B L D]; causal, so padding never reaches real slots."""
        hidden = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))  # [B L D]
        for layer in self.mamba_layers:
            hidden = layer(hidden)
        return hidden

    def forward(self, item_seq, item_seq_len):
        return self.gather_indexes(self.encode(item_seq), item_seq_len - 1)  # [B D]

    def sequence_output(self, interaction):
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
