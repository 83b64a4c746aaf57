"""The depthwise causal convolution over the sequence in PyTorch: the path on the CPU, and the
references of :mod:`kernels.causal_conv`'s Triton kernels.

- :func:`causal_conv1d`: on [B C L], with or without ``seq_idx`` (sequences laid end to end,
  each convolved on its own); what :class:`ssd.CausalConv1d` and the module path compute;
- :func:`conv_masked` and :func:`conv_less_crossings`: its two ways with ``seq_idx``;
- :func:`causal_conv_act_ref`: on [B L C] rows, then the activation, as the Triton kernels take
  them.

No Triton here: the CPU path imports this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x, weight, bias, seq_idx=None):
    """The convolution of :class:`ssd.CausalConv1d`: x [B C L], weight [C 1 K] -> [B C L].

    ``seq_idx`` [B L] (sequences laid end to end): a step sees only the earlier steps of its own
    sequence, as if each began after K - 1 zeros (:func:`conv_less_crossings` on the CPU,
    :func:`conv_masked` elsewhere: the same values).
    """
    length, width = x.shape[-1], weight.shape[-1]
    if seq_idx is not None:
        return (conv_less_crossings if x.device.type == "cpu" else conv_masked)(
            x, weight, bias, seq_idx)
    if x.device.type == "cpu" and x.stride(1) == 1:
        # x is a [B L C] tensor seen as [B C L]. On the CPU, the same convolution as a 2-D one
        # over that channels-last layout runs faster forward and backward (BENCHMARKS.md, History:
        # bench/cpu_parts.py), with no copy into [B C L]; the result is again
        # channels-last ([B L C] memory).
        out = F.conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, padding=(0, width - 1),
                       groups=x.shape[1])  # [B C 1 L+K-1]
        return out.squeeze(2)[..., :length]
    return F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., :length]


def conv_masked(x, weight, bias, seq_idx):  # [B C L], [C 1 K], [C], [B L] -> [B C L]
    """:func:`causal_conv1d` with ``seq_idx`` as K shifted products, each masked where the
    sequence changes: no wait for the host, so a GPU step can be captured."""
    length, width = x.shape[-1], weight.shape[-1]
    # on [B L C] (channels contiguous, as in_proj writes them): the products run fastest there
    padded = F.pad(x.transpose(1, 2), (0, 0, width - 1, 0))  # [B L+K-1 C]
    seq = F.pad(seq_idx, (width - 1, 0), value=-1)
    out = padded[:, width - 1:] * weight[:, 0, -1]  # the step itself: always its sequence
    for k in range(width - 1):
        same = (seq[:, k:k + length] == seq_idx).unsqueeze(-1)  # [B L 1]
        out = out.addcmul(padded[:, k:k + length] * same, weight[:, 0, k])
    return (out if bias is None else out + bias).transpose(1, 2)  # [B C L]


def conv_less_crossings(x, weight, bias, seq_idx):  # [B C L], [C 1 K], [C], [B L] -> [B C L]
    """:func:`causal_conv1d` with ``seq_idx`` as the convolution over whole rows, less what the
    first K - 1 steps of each sequence read before its start: few steps, found on the host (on the
    CPU, no wait), and one pass over the output where :func:`conv_masked` makes 2K."""
    width = weight.shape[-1]
    b, t, tap = [], [], []
    for shift in range(1, width):  # tap K-1-shift reads the step `shift` before
        rows, steps = torch.nonzero(seq_idx[:, shift:] != seq_idx[:, :-shift], as_tuple=True)
        b.append(rows)
        t.append(steps + shift)
        tap.append(torch.full_like(rows, width - 1 - shift))
    b, t, tap = torch.cat(b), torch.cat(t), torch.cat(tap)
    read = x[b, :, t + tap - (width - 1)] * weight[:, 0].t()[tap]  # [n C]
    out = causal_conv1d(x, weight, bias).transpose(1, 2)  # [B L C]
    return out.index_put((b, t), -read, accumulate=True).transpose(1, 2)


def causal_conv_act_ref(x, weight, bias, activation: str = "hardswish", seq_idx=None):
    """The reference: PyTorch's conv1d on [B C L] with K - 1 zeros in front, then the activation;
    with ``seq_idx``, each sequence of a row on its own (:func:`causal_conv1d`)."""
    width = weight.shape[-1]
    if seq_idx is not None:
        y = causal_conv1d(x.transpose(1, 2), weight.reshape(weight.shape[0], 1, width), bias,
                          seq_idx)
        return (F.hardswish(y) if activation == "hardswish" else F.silu(y)).transpose(1, 2)
    weight = weight.reshape(weight.shape[0], 1, width)
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight, bias, groups=x.shape[-1])
    y = F.hardswish(y) if activation == "hardswish" else F.silu(y)
    return y.transpose(1, 2)
