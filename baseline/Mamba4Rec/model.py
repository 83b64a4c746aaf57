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

Backends (``mamba_backend``), chosen once at construction and logged with the reason:
    ``cuda``    mamba-ssm's ``Mamba`` with its compiled selective scan; CUDA only.
    ``triton``  this project's Mamba-1 block (:mod:`baseline.Mamba4Rec.mamba_block`) on its Triton
                selective scan (:mod:`kernels.selective_scan`) and causal convolution; CUDA only.
    ``torch``   the same block on the PyTorch selective scan (:mod:`baseline.Mamba4Rec.scan`);
                any device.
    ``auto``    ``cuda`` where the model runs on CUDA and ``from mamba_ssm import Mamba`` works,
                else ``triton`` on CUDA, else ``torch``; a fallback on CUDA is logged as a warning.
The blocks hold the same parameters under mamba-ssm's state_dict keys (``in_proj.weight``,
``conv1d.{weight,bias}``, ``x_proj.weight``, ``dt_proj.{weight,bias}``, ``A_log``, ``D``,
``out_proj.weight``), drawn in the same order, and compute the same function, so a checkpoint of
one backend (or of mambapy's ``MambaBlock``) loads in another.

NOTE:
    1. As in the authors' code, the model-wide initialisation (normal(0, 0.02) for every Linear and
       Embedding weight, zero Linear biases) runs after the Mamba blocks are built, so it also
       overrides Mamba's own ``dt_proj`` initialisation (its bias, the inverse-softplus of a
       log-uniform step, becomes 0). ``A_log``, ``D`` and the convolution keep Mamba's init.
    2. Memory: no backend materialises the [B, L, 2D, d_state] states of the scan. The Triton scan
       keeps its inputs and the states at the ends of its chunks of steps for backward; the
       PyTorch scan keeps only its inputs, and the PyTorch convolution only its input. Both
       compute what they did not keep again in backward.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from baseline.Mamba4Rec.mamba_block import MambaBlock
from pipeline import compat
from pipeline.scoring import ItemScoring, take_settings

compat.apply()  # RecBole 1.2.1 on numpy 2 and pandas 3, in RecBole's own flow too

MAMBA_BACKENDS = ("auto", "cuda", "triton", "torch")

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


def triton_backend_problem(device) -> str | None:
    """Why this project's Triton scan cannot run for ``device``; None when it can."""
    if torch.device(device).type != "cuda":
        return f"the model runs on '{device}' and the Triton scan needs CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


def select_backend(requested: str, device) -> str:
    """Resolve ``mamba_backend`` to ``cuda``, ``triton`` or ``torch``, and log which and why;
    an explicit backend that cannot run is an error, never a fallback."""
    if requested not in MAMBA_BACKENDS:
        raise ValueError(f"mamba_backend must be one of {MAMBA_BACKENDS}, got {requested!r}")
    if requested == "torch":
        logger.info("Mamba4Rec: the PyTorch selective scan (mamba_backend 'torch').")
        return "torch"
    problems = {"cuda": cuda_backend_problem(device), "triton": triton_backend_problem(device)}
    if requested != "auto":
        if problems[requested] is not None:
            raise RuntimeError(f"mamba_backend '{requested}' was requested but "
                               f"{problems[requested]}")
        logger.info("Mamba4Rec: the '%s' selective scan (requested).", requested)
        return requested
    for backend in ("cuda", "triton"):
        if problems[backend] is None:
            logger.info("Mamba4Rec: the '%s' selective scan (auto%s).", backend,
                        "" if backend == "cuda" else f"; not 'cuda': {problems['cuda']}")
            return backend
    # On the CPU this is the designed path; on CUDA a fallback worth a warning.
    log = logger.warning if torch.device(device).type == "cuda" else logger.info
    log("Mamba4Rec: the PyTorch selective scan (auto; %s).",
        "; ".join(f"not '{backend}': {problem}" for backend, problem in problems.items()))
    return "torch"


def build_mamba_block(
    backend: str, d_model: int, d_state: int, d_conv: int, expand: int
) -> nn.Module:
    """A Mamba-1 mixer [B L D] -> [B L D] with mamba-ssm's parameter names."""
    if backend == "cuda":
        from mamba_ssm import Mamba

        return Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    return MambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)


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

    defaults_file = Path(__file__).with_name("config.yaml")  # any setting a Config lacks

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        take_settings(self, config, "hidden_size", "num_layers", "dropout_prob", "d_state",
                      "d_conv", "expand", "loss_type")
        self._check_config()
        self.backend = select_backend(config["mamba_backend"], self.device)

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
