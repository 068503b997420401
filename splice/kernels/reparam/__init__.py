"""The reparameterization family's ops (importing the package registers them): binary-coded
quantization (``bcq``: format and fitting), its lookup-table evaluation (``lut``), ``splice::bcq_linear``
(``ops``)."""
from splice.kernels.reparam import ops  # noqa: F401
