"""Triton kernels for the caches. Their PyTorch references: kernels/quantize.py (quantization, also the caches' own
path) and kernels/reference.py (float64 attention oracles, for the tests and scripts/gpu_check.py)."""
