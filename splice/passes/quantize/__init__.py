"""Quantization passes (weight-only and weight+activation)."""
from splice.passes.quantize import rtn  # noqa: F401
