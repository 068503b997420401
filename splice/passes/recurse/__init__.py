"""Recursion: a stack of blocks turned into fewer shared blocks run in loops (``slice.py``)."""
from splice.passes.recurse import slice  # noqa: F401
