"""mergekit's ``slices``: the output's layer stack assembled slice by slice, any merge method.

A slice lists ``sources`` (an input and a ``layer_range [first, end)`` each, all of one length); its
``k``-th output layer merges layer ``first + k`` of every source, with ``t = k / (length − 1)`` for
gradients. Tensors outside the stack merge over the first slice's sources when read before the
stack (embeddings) and over the last slice's after it (final norm, head), ``t = 0`` — as mergekit's
planner (``plan.py``) does. The base is the slice's ``base`` or the recipe's, and must be one of the
slice's sources for a method that uses one. A source's ``parameters`` come first, then the slice's,
then the top level. With one source per slice and ``passthrough`` this is a frankenmerge.

The output stack is a copy of the template's blocks (``ir/blocks.py``'s ``restack``: output layer
``k`` computes the ops of the template's block at its first source's layer, weights paired by graph
structure, named ``<stack>.{k}``); the units then name the restacked tensors.
"""
from __future__ import annotations

import json

from splice.errors import ConfigError
from splice.ir.blocks import restack, stack
from splice.ir.graph import Graph
from splice.passes.merge._units import MergeInputs, Unit, check_inputs


def _layout(slices: list[dict], counts: list[int], inputs: MergeInputs, who: str) -> list[tuple[int, int, float]]:
    """(slice, offset, t) of every output layer; errors for ranges outside a model or of unequal length."""
    out = []
    for s, sl in enumerate(slices):
        sources = sl.get("sources") or []
        if not sources:
            raise ConfigError(f"{who}: slices[{s}] has no sources")
        lengths = []
        for src in sources:
            a, b = src["layer_range"]
            if not 0 <= a < b <= counts[src["input"]]:
                raise ConfigError(f"{who}: slices[{s}] layer_range [{a}, {b}] is outside "
                                  f"'{inputs.names[src['input']]}' (layers 0..{counts[src['input']]})")
            lengths.append(b - a)
        if len(set(lengths)) > 1:
            raise ConfigError(f"{who}: slices[{s}]: every source needs the same number of layers, got {lengths}")
        n = lengths[0]
        out += [(s, o, o / (n - 1) if n > 1 else 1.0) for o in range(n)]
    return out


def _members(sl: dict, s: int, cfg, method, inputs: MergeInputs) -> tuple[list[int], int]:
    """The slice's merged inputs and its base (-1 where the method takes none), checked."""
    ids = [src["input"] for src in sl["sources"]]
    base = sl.get("base", cfg.base)
    if base >= 0 and method.base != "ignored" and base not in ids:
        raise ConfigError(f"merge.{method.name}: slices[{s}]: the base model '{inputs.names[base]}' is not one of "
                          "its sources")
    picked = check_inputs(method, len(ids), ids.index(base) if base in ids else -1, f"slices[{s}]: ")
    return [ids[p] for p in picked], base if method.base != "ignored" else -1


def slice_units(graph: Graph, cfg, method, inputs: MergeInputs) -> tuple[list[Unit], list]:
    """Restack ``graph`` (the template) to the slices' layout of ``cfg`` (a ``MergeConfig``) and
    return its units (module docstring) and the slices' description for the report."""
    who = f"merge.{method.name}"
    slices, top = json.loads(cfg.slices), inputs.top
    counts = [len(stack(g, who)) for g in inputs.graphs]
    layout = _layout(slices, counts, inputs, who)
    members = [_members(sl, s, cfg, method, inputs) for s, sl in enumerate(slices)]
    shared = [[sl.get("parameters") or {}, top] for sl in slices]
    own = [{src["input"]: [src.get("parameters") or {}, *shared[s]] for src in sl["sources"]}
           for s, sl in enumerate(slices)]

    def unit(target: str, s: int, source: dict[int, str], t: float) -> Unit:
        return Unit(target, source, members[s][0], members[s][1], shared[s], own[s], t)

    blocks = stack(graph, who)
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    start = min(order[n] for b in blocks for n in b.nodes)
    before = {a.target for n, i in order.items() if i < start for a in n.all_input_nodes if a.op == "get_attr"}
    in_blocks = tuple(b.path + "." for b in blocks)
    units = [unit(t, 0 if t in before else -1, {i: src[t] for i, src in enumerate(inputs.sources)}, 0.0)
             for t, v in graph.tensors().items() if v.is_floating_point() and not t.startswith(in_blocks)]
    plan, prefix = [], blocks[0].path.rsplit(".", 1)[0]
    for k, (s, o, t) in enumerate(layout):
        first = slices[s]["sources"][0]["layer_range"][0] + o
        path = blocks[first].path + "."
        plan.append((first, {name: graph.tensor(name) for name in graph.tensors() if name.startswith(path)}))
        for name in plan[-1][1]:
            if graph.tensor(name).is_floating_point():
                rest = name[len(path):]
                source = {src["input"]: inputs.sources[src["input"]][f"{blocks[src['layer_range'][0] + o].path}.{rest}"]
                          for src in slices[s]["sources"]}
                units.append(unit(f"{prefix}.{k}.{rest}", s, source, t))
    restack(graph, blocks, plan)
    described = [{"sources": [{"input": inputs.names[src["input"]], "layer_range": src["layer_range"]}
                              for src in sl["sources"]]} for sl in slices]
    return units, {"layers": len(layout), "layers_before": len(blocks), "slices": described}
