"""Pruning ops: ``splice::sparse_weight`` (a masked weight stored packed), ``splice::channel_gate``
(trainable relaxed gates on channels), ``splice::predicted_topk`` (input-dependent channel masks)."""
from splice.kernels.prune import ops  # noqa: F401
