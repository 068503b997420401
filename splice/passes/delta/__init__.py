"""Weight deltas (``delta.*``): a fine-tuned model carried as its base plus a delta (``delta.extract``),
compressed (``dare``, ``compeft``, ``bitdelta``, ``bitstack``, ``svd``), scaled, folded
(``delta.apply``), and Robust Weight Signatures (``delta.signature``); ops in ``kernels/delta``,
delta-only artifacts in ``ir/deltas.py``."""
from splice.passes.delta import apply, bitdelta, bitstack, compeft, dare, extract, scale, signature, svd  # noqa: F401
