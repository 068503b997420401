"""Instrument passes: insert observer ops that gather calibration statistics."""
from splice.passes.instrument import observe  # noqa: F401
