"""``python -m splice …`` (and ``torchrun -m splice …``): the ``splice`` command."""
import sys

from splice.cli import main

sys.exit(main())
