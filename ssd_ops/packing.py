"""A right-padded batch's real positions laid end to end (:class:`Packing`), and the reads and
writes at one position per sequence that the last layer uses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def at_positions(x, at):  # [B L ...], [B] -> [B ...]
    """``x[b, at[b]]`` for every b: one position of each sequence."""
    return x[torch.arange(x.shape[0], device=x.device), at]


def add_at_positions(x, at, rows):  # [B L ...], [B], [B ...]
    """``x[b, at[b]] += rows[b]`` for every b, in place; returns x."""
    return x.index_put_((torch.arange(x.shape[0], device=x.device), at), rows, accumulate=True)


class Packing(NamedTuple):
    """The real positions of a right-padded batch [B L], laid end to end in rows of slots.

    The batch's sequences, each cut to its ``len_b`` real positions, follow one another as one
    stream; the stream is cut into R rows of ``nominal`` slots, and a sequence that starts in a
    row stays whole in it: each row has ``L - 1`` more slots, for the one that runs past its end.
    Slots that hold no real position (before a row's first sequence, after its last, and after
    the stream, up to a fixed capacity, so that shapes need not depend on the batch) repeat the
    batch's first position and are numbered B: filler that nothing reads (its runs may pass state
    to one another). Rows, because mamba-ssm's scan passes its state from chunk to chunk one chunk
    after the other along a row: rows run those passes side by side (BENCHMARKS.md, section GPU step
    and memory).

    The layers see the slots as one sequence [1 S ...] (S = R * width); the convolution and the
    scan as R rows [R width ...], with ``seq_idx``, so that nothing passes from one sequence to
    the next: they compute at the real positions what they compute there in the padded batch
    (they are causal), and the position-wise rest does too.

    ``rows`` [S]: each slot's row of the batch flattened to [B*L]; ``seq_idx`` [R width] int32:
    each slot's sequence; ``last`` [B]: the slot of each sequence's last real position.
    """

    rows: torch.Tensor
    seq_idx: torch.Tensor
    last: torch.Tensor

    ROW_SLOTS = 8192  # nominal slots per row, at most, for mamba-ssm's Triton scan
    ROW_SEQUENCES = 16  # for the PyTorch scan: rows of this many full sequences, at most

    @classmethod
    def row_slots_for(cls, triton: bool, seqlen: int) -> int:
        """Nominal slots per row: ``ROW_SLOTS`` for mamba-ssm's Triton scan; for the PyTorch
        scan, whose pass between chunks is a loop in Python (rows make it shorter, not fewer
        steps), ``ROW_SEQUENCES`` times the length."""
        return cls.ROW_SLOTS if triton else cls.ROW_SEQUENCES * seqlen

    @classmethod
    def of(cls, lengths, seqlen: int, size: int, row_slots: int | None = None) -> Packing:
        """The packing of a batch whose sequences have ``lengths`` [B] (each in [1, seqlen]) real
        positions, for a stream of ``size`` slots (at least ``lengths.sum()``: not checked, which
        would wait for the GPU), in rows of ``row_slots`` nominal slots at most (default
        ``ROW_SLOTS``)."""
        batch, device = lengths.shape[0], lengths.device
        row_slots = row_slots or cls.ROW_SLOTS
        ends = torch.cumsum(lengths, 0)  # [B]
        starts = ends - lengths
        nrows = max(1, math.ceil(size / row_slots))
        nominal = max(1, math.ceil(size / nrows))
        width = nominal + seqlen - 1
        slot = torch.arange(nrows * width, device=device)
        row = slot // width
        stream = row * nominal + slot % width  # where in the stream each slot is
        seq = torch.searchsorted(ends, stream, right=True)  # B past the stream's end
        within = seq.clamp(max=batch - 1)
        real = (seq < batch) & (starts[within] // nominal == row)
        rows = torch.where(real, within * seqlen + stream - starts[within], 0)
        seq_idx = torch.where(real, within, batch).to(torch.int32).view(nrows, width)
        last = starts // nominal * width + starts % nominal + lengths - 1
        return cls(rows, seq_idx, last)

    def pack(self, x):  # [B L ...] -> [1 S ...]
        """``x`` at the slots' positions."""
        return x.flatten(0, 1).index_select(0, self.rows).unsqueeze(0)


def in_rows(t, seq_idx):  # [1 S ...] -> [R width ...] (a view); unchanged without seq_idx
    """A packed tensor as the rows of ``seq_idx`` (:class:`Packing`), for the convolution and the
    scan."""
    return t if seq_idx is None else t.view(*seq_idx.shape, *t.shape[2:])
