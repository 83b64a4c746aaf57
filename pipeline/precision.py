"""Mixed precision: what ``enable_amp: True`` trains in.

RecBole's trainer wraps each training step's forward in ``torch.autocast(device, enabled=
enable_amp)``, which on CUDA means float16 and asks for a GradScaler (``enable_scaler``) against
underflowing gradients. Here the autocast dtype is bfloat16 on every device (:func:`autocast`):
float32's range, so no loss scaling; the weights, their gradients and the optimizer stay float32.
Matrix products run in bfloat16; what each model keeps in float32 besides is its own business
(TiM4Rec: see the NOTE of :class:`tim4rec.TiM4Rec`; RecBole's models: autocast's own lists). The
cross-entropy over items takes its scores in float32 (autocast's lists; this project's models
cast them, :func:`pipeline.scoring.at_least_float32`). Evaluation runs without autocast, in
float32.

``enable_scaler`` (float16's loss scaling) is refused, not ignored: its documented range in
``config/overall.yaml`` is False alone (:mod:`pipeline.schema` holds every run to it). It would
have nothing to do, and the CUDA-graph step (:mod:`pipeline.cuda_graph`), which captures a
bfloat16 step as it does a float32 one, could not hold a GradScaler (it reads the gradients on the
host).
"""

from __future__ import annotations

import torch

DTYPE = torch.bfloat16


def autocast(device, enabled: bool = True):
    """The context of a training step's forward with ``enable_amp: enabled`` on ``device`` (a
    torch.device or its type): bfloat16 autocast, or none."""
    device_type = device if isinstance(device, str) else torch.device(device).type
    return torch.autocast(device_type, dtype=DTYPE, enabled=bool(enabled))

