"""Quantization passes (weight-only and weight+activation)."""
from splice.passes.quantize import awq, gptq, rtn  # noqa: F401
