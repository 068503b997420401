"""The quantization family's ops (importing the package registers them) and their math:
packing (``packing``), group grids (``grid``), fake quantization (``fake_quant``), look-up tables
(``lut``), int8 weights and activations (``w8a8``)."""
from splice.kernels.quant import ops  # noqa: F401
