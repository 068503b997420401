"""Merging: every method a pass over several graphs (``_common.py``), parameters matched by graph
structure (``ir/match.py``); ``api.merge`` and ``splice merge RECIPE.yaml`` drive them."""
from splice.passes.merge import (arcee_fusion, breadcrumbs, dare, della, fisher, karcher, linear,  # noqa: F401
                                 model_stock, multislerp, nearswap, nuslerp, passthrough, ram, regmean, sce,
                                 slerp, task_arithmetic, ties)
