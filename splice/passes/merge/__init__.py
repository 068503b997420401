"""Merging: every method a pass over several graphs (``_common.py``), parameters matched by graph
structure (``ir/match.py``); ``api.merge`` and ``splice merge RECIPE.yaml`` drive them."""
from splice.passes.merge import (arcee_fusion, breadcrumbs, dare, darex, della, delta_weighted,  # noqa: F401
                                 fisher, karcher, linear, model_stock, multislerp, mwa, nearswap, nuslerp,
                                 ota, passthrough, pcb, permute, ram, regmean, rmm, sce, slerp, task_arithmetic,
                                 ties, widen)
