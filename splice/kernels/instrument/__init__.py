"""The instrument family: ``splice::observe`` (importing the package registers it) and the
calibration statistics store it feeds (``store``)."""
from splice.kernels.instrument import ops  # noqa: F401
