"""TiM4Rec's training step on the CPU, the padded batch against its real positions only, by how
much of the batch is real.

    python bench/cpu_packing.py [--batch 2048] [--length 50] [--real 0.13,0.4,0.6,0.7,0.8]
        [--repeats 3]

At TiM4Rec's default width (movie_64d: D 64, 2 layers, time-aware), one forward and backward of
the loss on a random batch whose sequences are cut to lengths that make the given share of its
positions real, ``skip_padding: False`` against the batch packed (``ssd.Packing``, exactly as many
slots as it needs, on the CPU's rows). The median of ``--repeats`` after one warm-up each
(``cpu_parts.timed``); the two models share their weights. Prints a Markdown table; TiM4Rec packs a batch on the CPU where
its share of real positions is at most ``TiM4Rec.CPU_PACK_BELOW``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_parts import timed  # noqa: E402  (the script beside this one)
from tests.test_model import N_ITEMS, FakeDataset, make_config  # noqa: E402
from tim4rec import TiM4Rec  # noqa: E402


def batch_with(batch: int, length: int, real: float, seed: int = 0) -> dict:
    """A random batch whose real positions are ``real`` of batch x length (to 0.01): uniform
    lengths, then some made full or cut to a quarter until the share is reached."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    while lengths.double().mean() / length < real:
        lengths[torch.randint(0, batch, (1,), generator=g)] = length
    while lengths.double().mean() / length > real + 0.01:
        i = torch.randint(0, batch, (1,), generator=g)
        lengths[i] = max(1, int(lengths[i]) // 4)
    pad = torch.arange(length) >= lengths[:, None]
    items = torch.randint(1, N_ITEMS, (batch, length), generator=g).masked_fill(pad, 0)
    gaps = torch.randint(60, 10**6, (batch, length), generator=g)
    times = (1e9 + gaps.cumsum(1)).float().masked_fill(pad, 0)
    return {"item_id_list": items, "item_length": lengths, "timestamp_list": times,
            "item_id": torch.randint(1, N_ITEMS, (batch,), generator=g)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--real", default="0.13,0.4,0.6,0.7,0.8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = dict(MAX_ITEM_LIST_LENGTH=args.length, hidden_size=64, d_state=32, head_dim=32,
                  chunk_size=32)
    torch.manual_seed(0)
    padded = TiM4Rec(make_config(skip_padding=False, **config), FakeDataset()).train()
    packed = TiM4Rec(make_config(skip_padding=True, **config), FakeDataset()).train()
    packed.load_state_dict(padded.state_dict())
    packed.CPU_PACK_BELOW = 1.0  # pack every batch, to time it
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"L {args.length}")
    print("| real positions | padded s | packed s | packed / padded |")
    print("|---|---|---|---|")
    for real in (float(r) for r in args.real.split(",")):
        batch = batch_with(args.batch, args.length, real)
        share = float(batch["item_length"].double().mean()) / args.length
        plain = timed(lambda: padded.calculate_loss(batch), [], args.repeats)
        fast = timed(lambda: packed.calculate_loss(batch), [], args.repeats)
        print(f"| {share:.2f} | {plain:.2f} | {fast:.2f} | {fast / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
