"""Triton kernels for the caches, each beside its PyTorch reference."""
