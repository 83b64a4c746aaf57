"""The authors' TiM4Rec written out as plain tensor arithmetic, for the parity tests.

Independent of ``tim4rec.py`` and ``ssd.py`` on purpose: it reads the weights straight from an
upstream-format state_dict (the keys of the authors' checkpoints), spells out every convolution and
activation, and runs the SSD scan one step at a time. Evaluation mode (no dropout).
"""

from __future__ import annotations

import torch


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _hardswish(x):
    return x * torch.clamp(x + 3, 0, 6) / 6


def _silu(x):
    return x / (1 + torch.exp(-x))


def _causal_depthwise_conv(x, weight, bias):
    """x [B C L], weight [C 1 K]: out[t] = bias + sum_k w[k] * x[t - (K-1) + k],
    zeros before t = 0."""
    length, K = x.shape[-1], weight.shape[-1]
    out = bias[None, :, None].expand_as(x).clone()
    for k in range(K):
        shift = K - 1 - k
        if shift < length:
            out[..., shift:] += weight[None, :, 0, k, None] * x[..., : length - shift]
    return out


def _ssd_scan(x, dt, A, B, C, D):
    """x [B L H P], dt [B L H] (after softplus), A [H], B/C [B L N] (one group), D [H]."""
    batch, length, nheads, headdim = x.shape
    state = x.new_zeros(batch, nheads, headdim, B.shape[-1])
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)  # [B H]
        state = decay[..., None, None] * state + (dt[:, t, :, None, None]
                                                  * x[:, t, :, :, None] * B[:, t, None, None, :])
        ys.append((state * C[:, t, None, None, :]).sum(-1) + D[None, :, None] * x[:, t])
    return torch.stack(ys, dim=1)


def upstream_scores(sd: dict, cfg: dict, item_seq, item_len, timestamps):
    """Full-sort scores [B n_items] of the authors' model with weights ``sd``
    and settings ``cfg``."""
    eps, D_model = cfg["norm_eps"], cfg["hidden_size"]
    E, N = cfg["expand"] * D_model, cfg["d_state"]
    H, P = E // cfg["head_dim"], cfg["head_dim"]
    emb = sd["item_embedding.weight"]

    h = _layer_norm(emb[item_seq], sd["in_layer_norm.weight"], sd["in_layer_norm.bias"], eps)
    tau = None
    if cfg["is_time"]:
        ts = timestamps.float()  # upstream differences the float32 list
        gaps = torch.zeros_like(ts)
        gaps[:, 1:] = ts[:, 1:] - ts[:, :-1]
        tau = _layer_norm(gaps.to(emb.dtype), sd["layer_norm_time.weight"],
                          sd["layer_norm_time.bias"], eps)
        tau = tau[:, None, :].repeat(1, H, 1)  # [B H L]

    for i in range(cfg["num_layers"]):
        p = f"ssd_layers.{i}."
        s = p + "ssd."
        u = h
        proj = _linear(u, sd, s + "in_proj")
        z, xBC, dt = proj[..., :E], proj[..., E: 2 * E + 2 * N], proj[..., 2 * E + 2 * N:]
        xBC = _hardswish(_causal_depthwise_conv(
            xBC.transpose(1, 2), sd[s + "conv1d.weight"], sd[s + "conv1d.bias"]).transpose(1, 2))
        x, B, C = xBC[..., :E], xBC[..., E: E + N], xBC[..., E + N:]
        if cfg["is_time"]:
            scale = _linear(_silu(_linear(tau, sd, s + "mlp4time_scale.1")),
                            sd, s + "mlp4time_scale.3")
            g = tau * scale
            g = _hardswish(_causal_depthwise_conv(g, sd[s + "conv1d4time_1.weight"],
                                                  sd[s + "conv1d4time_1.bias"]))
            g = _hardswish(_causal_depthwise_conv(g, sd[s + "conv1d4time_2.weight"],
                                                  sd[s + "conv1d4time_2.bias"]))
            dt = dt * g.transpose(1, 2)
            r = torch.sigmoid(_linear(tau, sd, s + "time_gate_residual.1"))
            tau = _layer_norm(r * tau + (1 - r) * g, sd[s + "time_layer_norm.weight"],
                              sd[s + "time_layer_norm.bias"], eps)
        delta = torch.log1p(torch.exp(dt + sd[s + "dt_bias"]))
        y = _ssd_scan(x.reshape(*x.shape[:2], H, P), delta, -torch.exp(sd[s + "A_log"]), B, C,
                      sd[s + "D"]).reshape(*x.shape[:2], E)
        y = y * _silu(z)
        y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + eps) * sd[s + "norm.weight"]
        out = _linear(y, sd, s + "out_proj")
        h = _layer_norm(out + u if cfg["num_layers"] > 1 else out, sd[p + "layer_norm.weight"],
                        sd[p + "layer_norm.bias"], eps)
        if cfg["is_ffn"]:
            f = _linear(_hardswish(_linear(h, sd, p + "ffn.fc1")), sd, p + "ffn.fc2")
            h = _layer_norm(f + h, sd[p + "ffn.layer_norm.weight"], sd[p + "ffn.layer_norm.bias"],
                            1e-12)

    last = h[torch.arange(h.shape[0]), item_len - 1]  # [B D]
    return last @ emb.T


def upstream_keys(num_layers: int, is_time: bool, is_ffn: bool = True) -> set[str]:
    """The state_dict keys of the authors' TiM4Rec (reference section 3)."""
    keys = {"item_embedding.weight", "in_layer_norm.weight", "in_layer_norm.bias"}
    if is_time:
        keys |= {"layer_norm_time.weight", "layer_norm_time.bias"}
    for i in range(num_layers):
        s = f"ssd_layers.{i}.ssd."
        keys |= {s + k for k in ("dt_bias", "A_log", "D", "norm.weight")}
        parts = ["in_proj", "conv1d", "out_proj"]
        if is_time:
            parts += ["conv1d4time_1", "conv1d4time_2", "mlp4time_scale.1", "mlp4time_scale.3",
                      "time_gate_residual.1", "time_layer_norm"]
        keys |= {f"{s}{part}.{w}" for part in parts for w in ("weight", "bias")}
        keys |= {f"ssd_layers.{i}.layer_norm.{w}" for w in ("weight", "bias")}
        if is_ffn:
            keys |= {f"ssd_layers.{i}.ffn.{part}.{w}" for part in ("fc1", "fc2", "layer_norm")
                     for w in ("weight", "bias")}
    return keys
