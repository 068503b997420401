"""Pruning passes: unstructured (magnitude, Wanda, SparseGPT) and N:M. Masks live in the graph
(``ir/sparsity.py``) and survive every later pass."""
from splice.passes.prune import magnitude, nm, sparsegpt, wanda  # noqa: F401
