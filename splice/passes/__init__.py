"""Every pass family; importing this registers every built-in pass."""
from splice.passes import instrument, quantize  # noqa: F401
from splice.passes import adapters, delta, lowrank, merge, prune, recurse, share  # noqa: F401
from splice.passes import reparam  # noqa: F401
