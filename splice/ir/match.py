"""Which stored tensor of one graph is which of another's, from graph structure alone.

Merging, delta extraction and permutation alignment need every parameter of model B paired with
its counterpart in model A. mergekit pairs them by name through a hand-written template per
architecture; here they are paired by an isomorphism of the two graphs' *parameter-use graphs*
(``use_graph``, a networkx DiGraph): every op is a vertex labelled with its operator, every stored
tensor one labelled with its shape and dtype, and each edge carries the argument position it feeds,
so ``linear(x, W)`` and ``linear(W, x)`` differ and the data flow pins each block to its depth.

The isomorphism is found by canonical colours rather than a search (a general VF2 search backtracks
for minutes on a two-block decoder): each vertex's *forward* colour hashes its label with its inputs'
forward colours in argument order (what it computes from the graph inputs), its *backward* colour
hashes its label with its consumers' (argument position, backward and forward colour) pairs (where
its value goes), and its colour is both. Vertices of equal colour are paired in graph order; the
pairing is then checked edge by edge, so what is returned is an isomorphism. Two captures of one
architecture under different module names match; vertices that remain tied sit in symmetric
positions (any pairing of them is an isomorphism).

When there is none, ``explain_mismatch`` names the first parameter, in order of first use, whose
shape, dtype, reading op or argument position differs, or the first op that differs.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

import networkx as nx
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph


def _label(graph: Graph, node: fx.Node) -> str:
    if node.op == "get_attr":
        t = graph.tensor(node.target)
        return f"tensor{list(t.shape)}:{str(t.dtype).removeprefix('torch.')}"
    if node.op == "call_function":
        return str(node.target)
    return node.op  # placeholder, output


def _flat_inputs(node: fx.Node) -> list[fx.Node]:
    """``node``'s input nodes in argument order (nested lists flattened, kwargs after args)."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def use_graph(graph: Graph) -> nx.DiGraph:
    """The parameter-use graph (module docstring): vertices keyed by FX node name with ``label``,
    edges producer -> consumer with ``pos``, the argument position (a value read twice: the first)."""
    g = nx.DiGraph()
    for node in graph.gm.graph.nodes:
        g.add_node(node.name, label=_label(graph, node))
        for i, arg in enumerate(_flat_inputs(node)):
            if not g.has_edge(arg.name, node.name):
                g.add_edge(arg.name, node.name, pos=i)
    return g


def _hash(*parts) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()


def colours(g: nx.DiGraph) -> dict[str, str]:
    """Canonical colour of every vertex (module docstring)."""
    order = list(nx.topological_sort(g))
    fwd: dict[str, str] = {}
    for v in order:
        ins = sorted((d["pos"], fwd[u]) for u, _, d in g.in_edges(v, data=True))
        fwd[v] = _hash(g.nodes[v]["label"], ins)
    bwd: dict[str, str] = {}
    for v in reversed(order):
        outs = sorted((d["pos"], bwd[w], fwd[w]) for _, w, d in g.out_edges(v, data=True))
        bwd[v] = _hash(g.nodes[v]["label"], outs)
    return {v: _hash(fwd[v], bwd[v]) for v in g}


def isomorphism(ga: nx.DiGraph, gb: nx.DiGraph) -> dict[str, str] | None:
    """``{vertex of gb: vertex of ga}`` preserving labels and labelled edges, or None."""
    if ga.number_of_nodes() != gb.number_of_nodes() or ga.number_of_edges() != gb.number_of_edges():
        return None
    by_colour: dict[str, list[str]] = defaultdict(list)
    for v, c in colours(ga).items():
        by_colour[c].append(v)
    iso = {}
    for v, c in colours(gb).items():
        if not by_colour.get(c):
            return None
        iso[v] = by_colour[c].pop(0)
    for u, w, d in gb.edges(data=True):
        e = ga.get_edge_data(iso[u], iso[w])
        if e is None or e["pos"] != d["pos"]:
            return None
    return iso


def parameter_order(graph: Graph) -> list[fx.Node]:
    """The stored tensors' ``get_attr`` nodes in order of first use by an op."""
    seen, out = set(), []
    for node in graph.gm.graph.nodes:
        for arg in _flat_inputs(node):
            if arg.op == "get_attr" and arg.target not in seen:
                seen.add(arg.target)
                out.append(arg)
    return out


def _use_signature(graph: Graph, node: fx.Node) -> tuple:
    user = next((u for u in graph.gm.graph.nodes if u in node.users), None)
    position = _flat_inputs(user).index(node) if user is not None else None
    return _label(graph, node), str(user.target) if user is not None else None, position


def explain_mismatch(a: Graph, b: Graph, names: tuple[str, str] = ("A", "B")) -> str:
    """Why ``b`` does not match ``a``: the first parameter (in order of first use) whose shape, dtype,
    reading op or argument position differs; else the first op that differs."""
    pa, pb = parameter_order(a), parameter_order(b)
    for x, y in zip(pa, pb):
        sa, sb = _use_signature(a, x), _use_signature(b, y)
        if sa != sb:
            what = ("shape/dtype" if sa[0] != sb[0] else "the op reading it" if sa[1] != sb[1]
                    else "its argument position")
            return (f"parameter '{y.target}' of {names[1]} does not match '{x.target}' of {names[0]}: {what} differs "
                    f"({sb[0]} read by {sb[1]} arg {sb[2]} vs {sa[0]} read by {sa[1]} arg {sa[2]})")
    if len(pa) != len(pb):
        extra, more = (pa, names[0]) if len(pa) > len(pb) else (pb, names[1])
        return (f"{names[0]} has {len(pa)} parameters, {names[1]} {len(pb)}: '{extra[min(len(pa), len(pb))].target}' "
                f"of {more} has no counterpart")
    oa = [n for n in a.gm.graph.nodes if n.op == "call_function"]
    ob = [n for n in b.gm.graph.nodes if n.op == "call_function"]
    for x, y in zip(oa, ob):
        if x.target != y.target:
            return f"op '{y.name}' ({y.target}) of {names[1]} does not match '{x.name}' ({x.target}) of {names[0]}"
    return f"{names[0]} and {names[1]} have the same parameters but their graphs differ in structure"


def match_parameters(a: Graph, b: Graph, names: tuple[str, str] = ("A", "B"), who: str = "merge") -> dict[str, str]:
    """``{target in b: target in a}`` for every stored tensor, paired by the isomorphism of the
    parameter-use graphs; a ``ConfigError`` naming the first mismatch when there is none."""
    iso = isomorphism(use_graph(a), use_graph(b))
    if iso is None:
        raise ConfigError(f"{who}: {names[1]} is not the architecture of {names[0]}: {explain_mismatch(a, b, names)}")
    target_a = {n.name: n.target for n in a.gm.graph.nodes if n.op == "get_attr"}
    return {n.target: target_a[iso[n.name]] for n in b.gm.graph.nodes if n.op == "get_attr"}
