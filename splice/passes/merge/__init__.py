"""Merging: every method a pass over several graphs (``_common.py``), parameters matched by graph
structure (``ir/match.py``); ``api.merge`` and ``splice merge RECIPE.yaml`` drive them."""
from splice.passes.merge import (arcee_fusion, breadcrumbs, dare, della, karcher, linear, model_stock,  # noqa: F401
                                 multislerp, nearswap, nuslerp, ram, sce, slerp, task_arithmetic, ties)
