"""Pruning passes: unstructured (magnitude, Wanda, SparseGPT) and N:M, whose masks live in the graph
(``ir/sparsity.py``) and survive every later pass; structured (channels, heads), which physically
shrink the layers along the coupling analysis's groups (``ir/coupling.py``, ``ir/shrink.py``)."""
from splice.passes.prune import (allocate, bip, channels, depth, dimap, dpruner, dynamic, gates, heads, magnitude,  # noqa: F401
                                 nm, sparsegpt, wanda)
