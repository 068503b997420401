"""``merge.passthrough``: assemble a model from layer ranges of others (a "frankenmerge": mergekit's
``slices``), each tensor optionally multiplied by ``scale``. The output stack is a copy of the
template's repeated blocks (``ir/blocks.py``'s ``restack``) — the first slice's model — with block
``k`` holding layer ``j`` of its slice's model (paired by graph structure, so module names may
differ); tensors outside the stack come from the first slice's model when read before the stack
(embeddings), from the last slice's after it (final norm, LM head), as mergekit takes them.
Gradients over layers run along each slice (``t`` = position in the slice / (length − 1)).
Reference: mergekit's passthrough, https://github.com/arcee-ai/mergekit.
"""
from __future__ import annotations

import json

from splice.errors import ConfigError
from splice.ir.blocks import restack, stack
from splice.ir.graph import Graph, set_attr
from splice.ir.match import match_parameters
from splice.passes.base import PassContext, PassResult
from splice.passes.merge._common import (MergeConfig, MergeMethod, Param, check_float, recipe_names,
                                         register_merge, setting_value)

WHO = "merge.passthrough"


def _scaled(value, scale: float):
    """``value · scale``; integer buffers (position ids) are left as they are."""
    return value * scale if value.is_floating_point() else value


def _layers(slices: list[dict], counts: list[int], names: list[str]) -> list[tuple[int, int, float, dict]]:
    """(input, its layer, t, source parameters) of every output layer, slice by slice."""
    out = []
    for i, sl in enumerate(slices):
        sources = sl.get("sources") or []
        if len(sources) != 1:
            raise ConfigError(f"{WHO}: slices[{i}] has {len(sources)} sources; passthrough takes one per slice")
        src = sources[0]
        a, b = src["layer_range"]
        if not 0 <= a < b <= counts[src["input"]]:
            raise ConfigError(f"{WHO}: slices[{i}] layer_range [{a}, {b}] is outside '{names[src['input']]}' "
                              f"(layers 0..{counts[src['input']]})")
        n = b - a
        out += [(src["input"], a + o, o / (n - 1) if n > 1 else 1.0, src.get("parameters") or {}) for o in range(n)]
    return out


def passthrough(graph: Graph, cfg: MergeConfig, ctx: PassContext) -> PassResult:
    inputs: list[Graph] = list(ctx.graphs["inputs"])
    names = json.loads(cfg.names) or [f"input {i}" for i in range(len(inputs))]
    slices, top = json.loads(cfg.slices), json.loads(cfg.parameters)
    if not slices:
        raise ConfigError(f"{WHO}: needs slices (sources with a layer_range)")
    for g, n in zip(inputs, names):
        check_float(g, n, WHO)
    stacks = [stack(g, WHO) for g in inputs]
    layers = _layers(slices, [len(s) for s in stacks], names)
    template_blocks = stack(graph, WHO)
    inverse = [{a: b for b, a in match_parameters(graph, g, (names[0], n), WHO).items()} for g, n in zip(inputs, names)]
    plan = []
    for k, (i, j, t, params) in enumerate(layers):
        block_path = template_blocks[j].path + "."
        out_prefix = template_blocks[0].path.rsplit(".", 1)[0] + f".{k}."
        tensors = {}
        for target, src in inverse[i].items():
            if target.startswith(block_path):
                value = inputs[i].tensor(src).detach()
                name = out_prefix + target[len(block_path):]
                tensors[target] = _scaled(value, setting_value(METHOD, SCALE, [params, top], name, t))
        plan.append((j, tensors))
    first, last = layers[0][0], layers[-1][0]
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    start = min(order[n] for b in template_blocks for n in b.nodes)
    before = {a.target for n, i in order.items() if i < start for a in n.all_input_nodes if a.op == "get_attr"}
    in_blocks = tuple(b.path + "." for b in template_blocks)
    outside = [t for t in graph.tensors() if not t.startswith(in_blocks)]
    shown = recipe_names(graph, outside)
    for target in outside:
        i = first if target in before else last
        value = inputs[i].tensor(inverse[i][target]).detach()
        set_attr(graph.gm, target, _scaled(value, setting_value(METHOD, SCALE, [top], shown[target], 0.0)))
    restack(graph, template_blocks, plan)
    return PassResult(graph, True, {"method": "passthrough", "layers": len(layers),
                                    "layers_before": len(template_blocks),
                                    "slices": [{"input": names[s["sources"][0]["input"]],
                                                "layer_range": s["sources"][0]["layer_range"]} for s in slices]})


SCALE = Param("scale", float, 1.0, per_model=True, help="multiply each tensor by this")
METHOD = register_merge(MergeMethod("passthrough", "https://github.com/arcee-ai/mergekit", lambda g: g.tensors[0], (SCALE,),
                                    summary="Passthrough: layer slices of models stacked (frankenmerge)"), run=passthrough)
