"""Adapter tensors as graph inputs: a runtime feeds or swaps adapters per call without re-export.

Which tensors are adapter tensors comes from the IR alone (``Graph.param_roles``: every role that
starts with ``adapter`` — ``adapter``, ``adapter_scale``, ``adapter_frozen``, ``adapter_index`` —
as the op registry declares them), so no pass family is consulted.
"""
from __future__ import annotations

from splice.ir.graph import Graph, get_attr


def adapter_targets(graph: Graph) -> list[str]:
    """Stored names of the adapter tensors, in the order the ops read them (shared ones once)."""
    roles = graph.param_roles()
    out = [arg.target for node in graph.gm.graph.nodes if node.op == "call_function"
           for arg in node.args if getattr(arg, "op", None) == "get_attr" and roles[arg.target].startswith("adapter")]
    return list(dict.fromkeys(out))


def with_adapter_inputs(graph: Graph) -> Graph:
    """A copy of ``graph`` whose adapter tensors (A, B, scale … of every unfolded adapter) are graph
    inputs after the model's own, named like the stored tensor with ``.`` -> ``_`` and ``_in``
    (``..._q_proj_adapters_default_A_in``); the examples are their values. Exported, a runtime
    feeds or swaps adapters per call without re-export (same ranks; pad A's rows and B's columns
    with zeros for a smaller rank)."""
    out = graph.copy()
    fxg = out.gm.graph
    last = [n for n in fxg.nodes if n.op == "placeholder"][-1]
    values = []
    for target in adapter_targets(out):
        readers = [n for n in fxg.nodes if n.op == "get_attr" and n.target == target]
        with fxg.inserting_after(last):
            last = fxg.create_node("placeholder", target.replace(".", "_"), name=f"{target.replace('.', '_')}_in")
        for node in readers:
            node.replace_all_uses_with(last)
            fxg.erase_node(node)
        out.input_names.append(last.name)
        values.append(get_attr(graph.gm, target).detach())
    out.example_inputs = tuple(out.example_inputs) + tuple(values)
    return out.finalize()
