"""Reparameterization passes: shift-add (binary-coded weights, ``shiftadd``) and its per-layer
bit allocation (``shiftadd_allocate``)."""
from splice.passes.reparam import shiftadd, shiftadd_allocate  # noqa: F401
