"""``merge.passthrough``: each tensor taken from its one source, optionally multiplied by ``scale``.
With ``slices`` (``_slices.py``), one source per slice, it assembles a model from layer ranges of
others — a "frankenmerge" — paired by graph structure, so module names may differ; with ``models``,
one model rescaled. Reference: mergekit's passthrough, https://github.com/arcee-ai/mergekit.
"""
from __future__ import annotations

from splice.passes.merge._common import Group, MergeMethod, Param, register_merge


def passthrough(group: Group):
    return group.tensors[0] * group.params["scale"][0]


SCALE = Param("scale", float, 1.0, per_model=True, help="multiply each tensor by this")
register_merge(MergeMethod("passthrough", "https://github.com/arcee-ai/mergekit", passthrough, (SCALE,), max_models=1,
                           summary="Passthrough: layer slices of models stacked (frankenmerge), tensors scaled"))
