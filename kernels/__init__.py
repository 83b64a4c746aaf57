"""Triton kernels of this project, each beside its PyTorch reference (imported on a GPU only)."""
