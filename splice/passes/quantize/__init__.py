"""Quantization passes (weight-only and weight+activation)."""
from splice.passes.quantize import awq, discquant, gptq, reconstruct, rtn  # noqa: F401
from splice.passes.quantize import convert, qat  # noqa: F401
from splice.passes.quantize import allocate, nonuniform  # noqa: F401
from splice.passes.quantize import rotate, smoothquant, w8a8  # noqa: F401
from splice.passes.quantize import pvtune  # noqa: F401
