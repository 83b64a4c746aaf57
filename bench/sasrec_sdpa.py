"""RecBole's SASRec with its self-attention through PyTorch's fused attention: a benchmark control.

:class:`SASRecSDPA` and :class:`SASRecSDPACausal` are RecBole's SASRec
(``recbole.model.sequential_recommender.sasrec.SASRec``) with the same modules, so the same
parameters (state_dict keys and shapes) and, for a seed, the same initial weights, and the same
function. Only each layer's attention changes: ``torch.nn.functional.scaled_dot_product_attention``
(on a GPU a fused kernel, which keeps no [B, heads, L, L] weights for backward) instead of RecBole's
``softmax(Q K^T / sqrt(d) + mask) V`` with every intermediate kept for backward. They are not
registered models: benchmarks build them from SASRec's config (``bench/length_study.py``), and
``run.py --model=SASRec`` still trains RecBole's.

The masks:

- :class:`SASRecSDPA` adds RecBole's own mask (``get_attention_mask``: 0 where the key is a real
  item and not after the query, -10000 elsewhere) to the scaled scores, as RecBole does, in the
  scores' dtype. Every position's output is RecBole's (to rounding), padded queries included, and
  so is that of a query whose keys are all masked (a sequence padded on its left): -10000 leaves
  it a softmax over all its raw scores, where a boolean mask (-inf) would give NaN.
- :class:`SASRecSDPACausal` applies the causal mask alone (``is_causal=True``): no [B, 1, L, L]
  mask is built or read, and the kernel skips the blocks above the diagonal. RecBole pads
  sequences on the right, so a real position's causal window holds real items only, and padded
  positions, whose outputs differ, never reach a real one (attention is the only place where
  positions mix, and it looks back only). The scores and gradients are RecBole's; a sequence padded
  on its left, which RecBole never builds, would be scored differently.

In :class:`SASRecSDPACausal` a hidden key gets a weight of exactly 0; in RecBole it gets
``exp(score - 10000 - max)``, also exactly 0 in float32 and float64 while the scaled scores stay
far below 10000 in size.

Dropout on the attention weights: ``dropout_p = attn_dropout_prob`` in training, 0 in evaluation,
as RecBole's ``nn.Dropout`` on the softmax output: the same distribution, other draws.
"""

from __future__ import annotations

import torch.nn.functional as F
from recbole.model.layers import MultiHeadAttention
from recbole.model.sequential_recommender.sasrec import SASRec


class SDPAttention(MultiHeadAttention):
    """RecBole's ``MultiHeadAttention`` (its parameters and its dropout and LayerNorm after the
    output projection) computing the attention with ``scaled_dot_product_attention``.

    ``attention_mask``: RecBole's additive mask, [B, 1, L, L], or None for the causal mask alone.
    """

    def forward(self, input_tensor, attention_mask):
        batch, length, _ = input_tensor.shape

        def heads(x):  # [B, L, heads * d] -> [B, heads, L, d]
            return x.view(batch, length, self.num_attention_heads,
                          self.attention_head_size).transpose(1, 2)

        query = heads(self.query(input_tensor))
        mask = None if attention_mask is None else attention_mask.to(query.dtype)
        context = F.scaled_dot_product_attention(
            query, heads(self.key(input_tensor)), heads(self.value(input_tensor)), attn_mask=mask,
            dropout_p=self.attn_dropout.p if self.training else 0.0,
            is_causal=attention_mask is None)  # default scale 1 / sqrt(d), RecBole's
        context = context.transpose(1, 2).reshape(batch, length, self.all_head_size)
        hidden_states = self.out_dropout(self.dense(context))
        return self.LayerNorm(hidden_states + input_tensor)


class SASRecSDPA(SASRec):
    """RecBole's SASRec, its attention through ``scaled_dot_product_attention`` with RecBole's
    causal and padding mask (see the module docstring)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        for layer in self.trm_encoder.layer:
            # The same module object, initialised by SASRec: only its forward changes, so its
            # parameters, their names and the random draws of the initialisation are SASRec's.
            layer.multi_head_attention.__class__ = SDPAttention


class SASRecSDPACausal(SASRecSDPA):
    """:class:`SASRecSDPA` with the causal mask alone (``is_causal``): RecBole's scores and
    gradients for right-padded sequences, RecBole's layout (see the module docstring)."""

    def get_attention_mask(self, item_seq, bidirectional=False):
        if bidirectional:
            raise ValueError("SASRecSDPACausal masks causally only")
        return None  # SDPAttention: is_causal
