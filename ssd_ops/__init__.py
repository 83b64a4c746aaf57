"""The mechanics of the time-aware SSD layer (:mod:`ssd`), one concern a module.

- :mod:`ssd_ops.backend`: mamba-ssm's Triton modules, loaded without its package ``__init__``;
  which backend runs (``ssd_backend: auto|triton|torch``).
- :mod:`ssd_ops.scan`: the SSD scan in PyTorch, by its definition and chunked.
- :mod:`ssd_ops.packing`: a right-padded batch's real positions laid end to end.
- :mod:`ssd_ops.block_kernels`: the functions the fused block computes with, Triton or PyTorch.
- :mod:`ssd_ops.fused_block`: the block from in_proj to out_proj as one autograd node.
- :mod:`ssd_ops.amp`: autocast for the hand-written autograd nodes.

The PyTorch convolution and gated RMSNorm sit beside their Triton kernels, in
:mod:`kernels.causal_conv_ref` and :mod:`kernels.gated_norm_ref`.
"""
