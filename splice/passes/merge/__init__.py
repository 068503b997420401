"""Merging: every method a pass over several graphs (``_common.py``), parameters matched by graph
structure (``ir/match.py``); ``api.merge`` and ``splice merge RECIPE.yaml`` drive them."""
from splice.passes.merge import (breadcrumbs, dare, della, karcher, linear, model_stock, multislerp,  # noqa: F401
                                 nearswap, nuslerp, sce, slerp, task_arithmetic, ties)
