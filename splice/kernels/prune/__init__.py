"""Pruning ops: ``splice::sparse_weight`` (a masked weight stored packed)."""
from splice.kernels.prune import ops  # noqa: F401
