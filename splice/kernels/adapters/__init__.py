"""The adapter family's ops (importing the package registers them): updates beside a base
layer (``delta_ops``), sparse masks (``sparse_ops``), ops that read the base layer (``base_ops``)."""
from splice.kernels.adapters import base_ops, delta_ops, sparse_ops  # noqa: F401
