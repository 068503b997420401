"""Quantization passes (weight-only and weight+activation)."""
from splice.passes.quantize import gptq, rtn  # noqa: F401
