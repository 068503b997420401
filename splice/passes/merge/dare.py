"""``merge.dare_linear`` and ``merge.dare_ties``: DARE — drop each task-vector entry with
probability ``1 − density`` and rescale the rest (mergekit rescales to the L1 norm), then merge
linearly or with TIES's sign consensus (Yu et al., "Language models are Super Mario",
https://arxiv.org/abs/2311.03099). Seeded: the same seed gives the same merge."""
from splice.passes.merge._gta import random, register_gta

REFERENCE = "https://arxiv.org/abs/2311.03099"
register_gta("dare_linear", REFERENCE, "DARE: random drop and rescale, linear", sparsify=random, rescale=True)
register_gta("dare_ties", REFERENCE, "DARE: random drop and rescale, TIES sign consensus", sparsify=random,
             consensus=True, rescale=True)
