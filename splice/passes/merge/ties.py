"""``merge.ties``: TIES-Merging — trim each task vector to its largest ``density`` share, elect the
sign of each entry by the weighted sum, merge only the agreeing entries (Yadav et al.,
https://arxiv.org/abs/2306.01708)."""
from splice.passes.merge._gta import magnitude, register_gta

register_gta("ties", "https://arxiv.org/abs/2306.01708", "TIES: trim, elect sign, disjoint merge",
             sparsify=magnitude, consensus=True, normalize=True)
