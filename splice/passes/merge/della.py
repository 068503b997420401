"""``merge.della`` and ``merge.della_linear``: DELLA-Merging — MagPrune drops task-vector entries at
random with a keep probability from ``density − epsilon`` to ``density + epsilon`` by magnitude rank,
rescaled, then merged with TIES's sign consensus or linearly (Deep et al.,
https://arxiv.org/abs/2406.11617)."""
from splice.passes.merge._common import Param
from splice.passes.merge._gta import magprune, register_gta

REFERENCE = "https://arxiv.org/abs/2406.11617"
EPSILON = (Param("epsilon", float, 0.15, per_model=True, check=lambda x: 0 <= x < 1, valid="[0, 1)",
                 help="spread of the keep probabilities around density"),)
register_gta("della", REFERENCE, "DELLA: magnitude-ranked random drop, TIES sign consensus", sparsify=magprune,
             consensus=True, normalize=True, rescale=True, extra=EPSILON)
register_gta("della_linear", REFERENCE, "DELLA: magnitude-ranked random drop, linear", sparsify=magprune,
             rescale=True, extra=EPSILON)
