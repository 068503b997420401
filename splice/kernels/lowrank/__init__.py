"""The low-rank family's ops (importing the package registers them): a linear stored as factors
(``lowrank_linear``, ``dense_sparse_linear``) and a low-rank correction beside a compressed layer
(``lowrank_correction``); their math in ``factors``, ONNX translations in ``onnx``."""
from splice.kernels.lowrank import ops  # noqa: F401
__all__ = ["ops"]
