"""Triton kernels of this project, each beside its PyTorch reference (imported on a GPU only)."""


def check_offsets(what: str, *tensors) -> None:
    """The kernels address elements with 32-bit offsets: refuse tensors that reach beyond them
    (``what`` names the caller in the error)."""
    for t in tensors:
        if sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"{what}: a tensor of shape {tuple(t.shape)} is too large for 32-bit "
                             "offsets; use a smaller batch")
