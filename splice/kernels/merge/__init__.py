"""Merging's op: ``splice::basis_weight`` (reversible merging's weight, ``ops.py``; ONNX in ``onnx.py``)."""
from splice.kernels.merge import ops  # noqa: F401
