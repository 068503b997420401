"""Every op family. Importing this module registers every splice op in ``kernels.registry``
(``ir`` imports it before it reads kinds, roles or weight access); a new family adds its line here."""
from splice.kernels import adapters, delta, instrument, lowrank, merge, prune, quant, reparam  # noqa: F401
