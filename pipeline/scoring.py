"""What TiM4Rec and the sequential baselines share: the scoring head, and reading settings.

A model encodes the input sequence into one vector per user, ``sequence_output(interaction)``
[B D], and scores an item by the dot product with that item's embedding (the input embeddings,
tied), plus a per-item bias where the model has one (``self.item_bias``, LRURec). From those two
pieces :class:`ItemScoring` gives RecBole's three entry points. :func:`take_settings` copies a
model's settings from its Config onto attributes of the same names.
"""

from __future__ import annotations

import torch


class ItemScoring:
    """RecBole's ``calculate_loss``, ``predict`` and ``full_sort_predict`` from ``sequence_output``.

    Mix in before ``SequentialRecommender``. The model sets ``item_embedding`` and ``loss_fct``:
    cross-entropy over all items (``loss_type: CE``), or RecBole's BPRLoss against the sampled
    negative item (``loss_type: BPR``); and it defines ``forward(item_seq, item_seq_len)`` -> [B D]
    or overrides :meth:`sequence_output`.
    """

    def sequence_output(self, interaction):
        """One vector per sequence [B D]: by default ``forward(item_seq, item_seq_len)``, as
        RecBole's sequential models take it; a model that reads more (times) overrides this."""
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def item_scores(self, seq_output, items=None):
        """Scores [B] of ``items`` [B], or [B n_items] of every item when ``items`` is None."""
        bias = getattr(self, "item_bias", None)
        if items is None:
            scores = seq_output @ self.item_embedding.weight.T  # [B n_items]
            return scores if bias is None else scores + bias
        scores = (seq_output * self.item_embedding(items)).sum(-1)  # [B]
        return scores if bias is None else scores + bias[items]

    def calculate_loss(self, interaction):
        """The training loss; its scores in float32 at least (under autocast, the product with
        every item's embedding runs in bfloat16, and the softmax over its output in float32)."""
        seq_output = self.sequence_output(interaction)
        positives = interaction[self.POS_ITEM_ID]
        if getattr(self, "loss_type", "CE") == "BPR":
            negatives = interaction[self.NEG_ITEM_ID]
            return self.loss_fct(at_least_float32(self.item_scores(seq_output, positives)),
                                 at_least_float32(self.item_scores(seq_output, negatives)))
        return self.loss_fct(at_least_float32(self.item_scores(seq_output)), positives)

    def predict(self, interaction):
        return self.item_scores(self.sequence_output(interaction), interaction[self.ITEM_ID])

    def full_sort_predict(self, interaction):
        return self.item_scores(self.sequence_output(interaction))


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 where it is in a half precision (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def take_settings(model, config, *keys: str) -> None:
    """Sets ``model.<key> = config[<key>]`` for each of ``keys``."""
    for key in keys:
        setattr(model, key, config[key])
