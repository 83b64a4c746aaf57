"""The time-aware SSD block from in_proj to out_proj as one autograd node (:class:`FusedSSDBlock`),
and the helpers of such hand-written backward passes (:func:`column_sums`, :func:`in_proj_parts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd_ops.amp import amp_backward, amp_forward, cast
from ssd_ops.packing import add_at_positions, at_positions, in_rows


def in_proj_parts(weight, bias, d_inner: int) -> tuple:
    """in_proj's weight and bias as z's part and the rest's: ``((w_z, b_z), (w_rest, b_rest))``."""
    return ((weight[:d_inner], None if bias is None else bias[:d_inner]),
            (weight[d_inner:], None if bias is None else bias[d_inner:]))


class FusedSSDBlock(torch.autograd.Function):
    """:class:`ssd.TimeAwareSSD` from its input to out_proj's output, as one autograd node.

    ``apply(u, in_weight, in_bias, gate, conv_weight, conv_bias, A, D, dt_bias, norm_weight,
    out_weight, out_bias, at, seq_idx, block, kernels)``: ``u`` [B L D] is the block's input,
    ``gate`` [B L H] the time gate of the step sizes (or None); ``block`` gives the sizes and
    settings; returns [B L D], or with ``at`` [B] (a position per sequence) the output there only,
    [B D]. With ``seq_idx`` [R width], ``u`` and ``gate`` hold the slots of a
    :class:`ssd_ops.packing.Packing`, [1 S ..], and ``at`` is slots: the convolution and the scan
    see the slots as those rows, and keep each sequence from the next.

    The same operations as the module path (in_proj, convolution and activation, scan, gated
    RMSNorm, out_proj), with the functions of ``kernels`` (on the GPU: mamba-ssm's scan,
    :mod:`kernels.gated_norm`, and :mod:`kernels.causal_conv`, which reads in_proj's output in
    place), kept differently for backward. Autograd would keep, per layer, in_proj's output, the
    convolution's output and its activation, copies of x, B and C made contiguous for the scan, and
    the norm's output. This node keeps the block's input (as in_proj alone would), the scan's
    output and the norm's 1/rms, and computes in_proj, the convolution, the activation and the
    norm's output again in backward (the norm's backward kernel does the latter): one
    more product the size of in_proj's, for the largest tensor that a layer would keep. It does so
    in two parts, z first, so that z and its gradient are gone before the scan's backward, where
    the memory peaks; with a time gate, the gradient of in_proj's output is allocated after it too.
    The scan's gradients of x, B and C land in one tensor, and those of x, B, C and the step sizes
    before the convolution in another, with no concatenation. mamba-ssm's fused Mamba-2 block does
    much the same, but needs the compiled causal-conv1d, has no time gate, and uses SiLU only.

    With ``at``, z's part of in_proj, the gated norm and out_proj run at those positions only
    (nothing else reads the block's output), and the node keeps the scan's output there only; the
    scan itself still runs over every position, whose states the wanted ones need.

    Under autocast (bfloat16), in_proj and out_proj multiply in bfloat16, and what they write (z,
    x, B, C, dt, the output) is bfloat16, as is what the convolution, the scan and the norm write
    from it; each of those computes in float32 inside (the scan's step sizes, decays and states;
    the norm's statistics). The step sizes times the time gate (float32) are float32. The node
    keeps the block's input in bfloat16; the gradients of u, the gate and the weights come back
    in their own dtypes (float32).
    """

    @staticmethod
    @amp_forward
    def forward(ctx, u, in_weight, in_bias, gate, conv_weight, conv_bias, A, D, dt_bias,
                norm_weight, out_weight, out_bias, at, seq_idx, block, kernels):
        batch, seqlen, _ = u.shape
        E = block.d_inner
        ctx.u_dtype = u.dtype
        u = u.to(ctx.dtype)  # [B L D], as the products take it (and as it is kept)
        w_in, b_in, w_out, b_out = cast(ctx.dtype, in_weight, in_bias, out_weight, out_bias)
        if at is None:
            z, xBC, dt = block.split_projection(F.linear(u, w_in, b_in))
        else:
            (w_z, b_z), (w_rest, b_rest) = in_proj_parts(w_in, b_in, E)
            z = F.linear(at_positions(u, at), w_z, b_z)  # [B E]
            xBC, dt = torch.split(F.linear(u, w_rest, b_rest), [E + 2 * block.d_state,
                                                                 block.nheads], dim=-1)
        x, B, C = block.split_conv_output(kernels.conv_fwd(  # [B L ..], or packed [R width ..]
            in_rows(xBC, seq_idx), conv_weight, conv_bias, block.conv_activation, seq_idx))
        if gate is not None:
            dt = dt * gate  # [B L H]
        y = kernels.scan_fwd(x, in_rows(dt, seq_idx), A, B, C, block.chunk_size, D, dt_bias,
                             block.dt_limit, seq_idx)
        y = y.reshape(-1, E) if at is None else at_positions(y.reshape(batch, seqlen, E), at)
        normed, rstd = kernels.norm_fwd(y, z.reshape(-1, E), norm_weight, block.norm.eps)  # [T E]
        ctx.save_for_backward(u, in_weight, in_bias, gate, conv_weight, conv_bias, A, D, dt_bias,
                              norm_weight, out_weight, y, rstd, at, seq_idx)
        ctx.block, ctx.kernels, ctx.has_out_bias = block, kernels, out_bias is not None
        out = F.linear(normed, w_out, b_out)  # [T D] or [B D]
        return out.view(batch, seqlen, -1) if at is None else out

    @staticmethod
    @amp_backward
    def backward(ctx, dout):  # [B L D], or [B D] with at
        (u, in_weight, in_bias, gate, conv_weight, conv_bias, A, D, dt_bias, norm_weight,
         out_weight, y, rstd, at, seq_idx) = ctx.saved_tensors
        block, kernels = ctx.block, ctx.kernels
        E = block.d_inner
        w_in, b_in, w_out = cast(ctx.dtype, in_weight, in_bias, out_weight)
        u2 = u.reshape(-1, u.shape[-1])  # [T D]
        u_out = u2 if at is None else at_positions(u, at)  # where the output is: [T D] or [B D]
        # in_proj again in two parts, z and the rest, so that z and its gradient are gone before
        # the scan's backward (where the memory peaks)
        (w_z, b_z), (w_rest, b_rest) = in_proj_parts(w_in, b_in, E)

        # out_proj, the gated norm (its output computed again, for out_proj's weight), z's part of
        # in_proj
        dout = dout.to(ctx.dtype).reshape(-1, dout.shape[-1])  # [T D] or [B D]
        z = F.linear(u_out, w_z, b_z)  # [T E] or [B E]
        dz = torch.empty_like(z)
        dy, dnorm_weight, normed = kernels.norm_bwd(dout @ w_out, y, z, norm_weight,
                                                    block.norm.eps, rstd, dz)
        del z
        dout_weight = dout.t() @ normed
        dout_bias = column_sums(dout) if ctx.has_out_bias else None
        del normed
        du_out = dz @ w_z  # [T D] or [B D]
        din_weight_z, din_bias_z = dz.t() @ u_out, None if in_bias is None else column_sums(dz)
        del dz
        if at is not None:  # the scan's output has no gradient where the block's is not wanted
            dy = add_at_positions(dy.new_zeros(*u.shape[:-1], E), at, dy)  # [B L E]

        # the convolution and its activation again, the scan's backward into one tensor, then the
        # convolution's backward straight into the gradient of in_proj's output
        xBCdt = F.linear(u2, w_rest, b_rest).view(*u.shape[:-1], -1)  # [B L E+2N+H]
        sizes = [E + 2 * block.d_state, block.nheads]
        xBC, dt_in = torch.split(in_rows(xBCdt, seq_idx), sizes, dim=-1)  # packed: [R width ..]
        if gate is None:  # the scan writes dt's gradient straight into that of in_proj's output
            dxBCdt = torch.empty_like(xBCdt)
            dt, ddt = dt_in, in_rows(dxBCdt, seq_idx)[..., sizes[0]:]
        else:  # into a tensor of its own: in_proj's comes after the scan's backward (the peak)
            dt = dt_in * in_rows(gate, seq_idx)
            ddt = torch.empty_like(dt)  # in the gated steps' dtype (float32 under autocast)
        conv_out = kernels.conv_fwd(xBC, conv_weight, conv_bias, block.conv_activation, seq_idx)
        dconv_out = torch.empty_like(conv_out)  # [B L E+2N]
        dx, dB, dC = block.split_conv_output(dconv_out)
        x, B, C = block.split_conv_output(conv_out)
        dA, dD, ddt_bias = kernels.scan_bwd(dy.view_as(x), x, dt, A, B, C, block.chunk_size, D,
                                            dt_bias, block.dt_limit, seq_idx, dx, ddt, dB, dC)
        del conv_out, x, B, C, dy
        dgate = None
        if gate is not None:
            dxBCdt = torch.empty_like(xBCdt)
            dgate = (ddt * dt_in).view_as(gate)
            torch.mul(ddt.view_as(gate), gate, out=dxBCdt[..., sizes[0]:])
        dxBC = in_rows(dxBCdt, seq_idx)[..., :sizes[0]]
        _, dconv_weight, dconv_bias = kernels.conv_bwd(xBC, conv_weight, conv_bias, dconv_out,
                                                       block.conv_activation, dxBC, seq_idx)
        del xBCdt, xBC, dt_in, dconv_out

        # the rest of in_proj
        dxBCdt = dxBCdt.reshape(-1, dxBCdt.shape[-1])  # [T E+2N+H]
        if at is None:
            du = du_out.addmm_(dxBCdt, w_rest).view_as(u)
        else:
            du = add_at_positions((dxBCdt @ w_rest).view_as(u), at, du_out)
        din_weight = torch.cat([din_weight_z, dxBCdt.t() @ u2])
        din_bias = None if in_bias is None else torch.cat([din_bias_z, column_sums(dxBCdt)])
        # the products' gradients in their inputs' and parameters' dtypes (a no-op without amp)
        du, din_weight, din_bias = du.to(ctx.u_dtype), *cast(in_weight.dtype, din_weight, din_bias)
        dout_weight, dout_bias = cast(out_weight.dtype, dout_weight, dout_bias)
        return (du, din_weight, din_bias, dgate, dconv_weight, dconv_bias, dA, dD, ddt_bias,
                dnorm_weight, dout_weight, dout_bias, None, None, None, None)


def column_sums(m):  # [T N] -> [N]
    """``m.sum(0)`` as a matrix-vector product, which reads a tall [T N] matrix at a higher
    bandwidth than PyTorch's column reduction on a GPU (the bias gradients: BENCHMARKS.md, History:
    ``bench/column_sums.py``)."""
    return torch.mv(m.t(), m.new_ones(m.shape[0]))
