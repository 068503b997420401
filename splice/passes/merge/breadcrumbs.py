"""``merge.breadcrumbs`` and ``merge.breadcrumbs_ties``: Model Breadcrumbs — drop both the
smallest entries and the ``gamma`` share of largest outliers of each task vector (Davari and
Belilovsky, https://arxiv.org/abs/2312.06795), linearly or with TIES's sign consensus."""
from splice.passes.merge._common import Param
from splice.passes.merge._gta import outliers, register_gta

REFERENCE = "https://arxiv.org/abs/2312.06795"
GAMMA = (Param("gamma", float, 0.01, per_model=True, check=lambda x: 0 <= x < 1, valid="[0, 1)",
               help="share of largest-magnitude outliers dropped"),)
register_gta("breadcrumbs", REFERENCE, "Model Breadcrumbs: drop small entries and outliers", sparsify=outliers,
             extra=GAMMA)
register_gta("breadcrumbs_ties", REFERENCE, "Model Breadcrumbs with TIES sign consensus", sparsify=outliers,
             consensus=True, extra=GAMMA)
