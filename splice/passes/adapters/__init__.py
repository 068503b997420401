"""Adapter passes: LoRA (and its inits), fold/unfold; the framework is in ``_common.py``."""
from splice.passes.adapters import fold, lora  # noqa: F401
