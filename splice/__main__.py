"""``python -m splice …`` (and ``torchrun -m splice …``): the ``splice`` command."""
from splice.cli import entry

entry()
