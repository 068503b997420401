"""Instrument passes: insert observer ops that gather calibration statistics, and strip them."""
from splice.passes.instrument import observe, strip  # noqa: F401
