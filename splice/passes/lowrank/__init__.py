"""Low-rank and factorized compensation: ``lowrank.svd`` (a linear as rank-r factors), ``lowrank.eora``
(a compressed layer's error, projected into its input eigenspace, as a low-rank correction beside it),
``lowrank.dsformer`` (dense × semi-structured-sparse factors), ``lowrank.pela`` (low-rank factors
recovered by feature distillation). One module per method; ``_common`` holds what they share."""
from splice.passes.lowrank import dsformer, eora, svd  # noqa: F401
__all__ = ["dsformer", "eora", "svd"]
