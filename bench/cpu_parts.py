"""The three CPU shortcuts of ssd.TimeAwareSSD, each timed against the plain computation it replaces.

    python bench/cpu_parts.py [--batch 2048] [--length 50] [--repeats 5]

At TiM4Rec's default width (D 64, E 128, N 32, 4 heads of 32), forward plus backward, median of
``--repeats`` after one warm-up, on whatever threads torch uses here:

- the x/B/C depthwise convolution of a [B L C] tensor: nn.Conv1d's own forward, against the 2-D
  channels-last path that CausalConv1d takes;
- in_proj and that convolution: one product split in three (xBC a strided view), against three
  products with slices of its weight (xBC contiguous);
- the PyTorch scan: chunks of chunk_size 32, against the whole sequence as one chunk.

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ssd  # noqa: E402


def timed(fn, inputs, repeats):
    """Median seconds of ``fn(*inputs)`` forward + backward (sum of outputs), after a warm-up."""
    def once():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in out).backward()

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    b, length = args.batch, args.length
    block = ssd.TimeAwareSSD(64, max_seq_length=length, d_state=32, head_dim=32, chunk_size=32,
                             backend="torch")
    channels = block.d_inner + 2 * block.d_state
    rows = []

    conv = block.conv1d
    xbc = torch.randn(b, length, channels, requires_grad=True)  # as project_in gives it
    rows.append(("depthwise conv of [B, L, E+2N]",
                 timed(lambda x: torch.nn.Conv1d.forward(conv, x.transpose(1, 2))[..., :length],
                       [xbc], args.repeats),
                 timed(lambda x: conv(x.transpose(1, 2)), [xbc], args.repeats)))

    u = torch.randn(b, length, 64, requires_grad=True)
    sizes = [block.d_inner, channels, block.nheads]

    def split_then_conv(x):
        z, xbc, dt = torch.split(block.in_proj(x), sizes, dim=-1)
        return z, conv(xbc.transpose(1, 2)), dt

    def three_then_conv(x):
        z, xbc, dt = block.project_in(x)
        return z, conv(xbc.transpose(1, 2)), dt

    rows.append(("in_proj, then that conv", timed(split_then_conv, [u], args.repeats),
                 timed(three_then_conv, [u], args.repeats)))

    h, p, n = block.nheads, block.head_dim, block.d_state
    x = torch.randn(b, length, h, p, requires_grad=True)
    dt = torch.randn(b, length, h, requires_grad=True)
    bm = torch.randn(b, length, 1, n, requires_grad=True)
    cm = torch.randn(b, length, 1, n, requires_grad=True)
    a = -torch.rand(h) - 0.5

    def scan(chunk):
        return lambda *t: ssd.chunk_scan_torch(*t[:2], a, *t[2:], chunk, D=block.D,
                                               dt_bias=block.dt_bias, dt_softplus=True)

    rows.append((f"PyTorch scan, L {length}", timed(scan(32), [x, dt, bm, cm], args.repeats),
                 timed(scan(block.scan_chunk_size(x)), [x, dt, bm, cm], args.repeats)))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}, L {length}")
    print("| part (forward + backward) | plain s | as TimeAwareSSD runs it on the CPU s | ratio |")
    print("|---|---|---|---|")
    for name, plain, fast in rows:
        print(f"| {name} | {plain:.3f} | {fast:.3f} | {fast / plain:.2f} |")


if __name__ == "__main__":
    main()
