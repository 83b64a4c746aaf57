"""Comparing tensors in the tests."""

import torch


def rel_err(a, b) -> float:
    """``|a - b| / |b|`` in the Frobenius norm; ``|a - b|`` where b is zero."""
    denominator = b.norm()
    return ((a - b).norm() / torch.where(denominator > 0, denominator, 1.0)).item()
