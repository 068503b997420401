"""Weight sharing: tensors (``tie.py``) and whole blocks (``layers.py``) stored once, read many times."""
from splice.passes.share import dictionary, layers, tie  # noqa: F401
