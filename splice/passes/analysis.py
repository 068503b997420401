"""Shared analyses: what one pass computes that a later pass may reuse (``PassContext.cache``).

An entry is keyed by ``(analysis name, value fingerprint, parameters)``. A value's fingerprint
hashes the computation that produces it, Merkle-style over the graph: a node's op, its literal
arguments and its inputs' fingerprints; a stored tensor by an identity token (never reused,
even when Python reuses an ``id``) and its in-place version counter; an input by its position.
So a statistic gathered on graph G is found again only where the same value is computed from
the same tensors: a pass that replaces a weight (passes never write tensors in place) changes
the fingerprint of every value downstream of it, and nothing stale is ever returned.

The Pipeline makes one cache per run (or uses the caller's, to share across runs on one
graph) and, after each pass, keeps only entries whose values its input graph or the current
graph still compute (``retain``), so memory stays bounded by what could still be reused.
"""
from __future__ import annotations

import hashlib
import itertools
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

_TOKENS: dict[int, tuple[weakref.ref, int]] = {}
_NEXT = itertools.count()


def tensor_token(t: torch.Tensor) -> int:
    """A number for this tensor object, unique over the process's lifetime."""
    held = _TOKENS.get(id(t))
    if held is not None and held[0]() is t:
        return held[1]
    key, token = id(t), next(_NEXT)

    def forget(_ref, key=key, token=token):
        if _TOKENS.get(key, (None, None))[1] == token:
            del _TOKENS[key]

    _TOKENS[key] = (weakref.ref(t, forget), token)
    return token


def tensors_fingerprint(tensors: Any) -> str:
    """Fingerprint of (nested tuples/lists of) tensors by identity, version, shape and dtype:
    calibration data, for one."""
    return _digest(_describe(tensors, {}))


def value_fingerprints(graph) -> dict[fx.Node, str]:
    """The fingerprint of every node's value in ``graph`` (an ``ir.graph.Graph``)."""
    out: dict[fx.Node, str] = {}
    position = 0
    for node in graph.gm.graph.nodes:
        if node.op == "placeholder":
            desc, position = ("input", position), position + 1
        elif node.op == "get_attr":
            desc = ("attr", _describe(_attr(graph.gm, node.target), out))
        else:
            desc = (node.op, str(node.target), _describe(node.args, out), _describe(node.kwargs, out))
        out[node] = _digest(desc)
    return out


def graph_fingerprint(graph) -> str:
    """The fingerprint of the whole computation (its output node's)."""
    fps = value_fingerprints(graph)
    return next(fps[n] for n in reversed(graph.gm.graph.nodes) if n.op == "output")


@dataclass
class AnalysisCache:
    """Analysis results by ``(name, value fingerprint, params)``; ``computed`` counts how many
    times each analysis actually ran (what a cache hit saves, visible to tests and reports)."""

    entries: dict[tuple[str, str, Any], Any] = field(default_factory=dict)
    computed: Counter = field(default_factory=Counter)

    def get(self, name: str, fingerprint: str, params: Any = ()) -> Any:
        return self.entries.get((name, fingerprint, params))

    def put(self, name: str, fingerprint: str, params: Any, value: Any) -> None:
        self.entries[(name, fingerprint, params)] = value

    def ran(self, name: str) -> None:
        """Count one run of analysis ``name``."""
        self.computed[name] += 1

    def retain(self, *graphs) -> None:
        """Drop the entries for values none of ``graphs`` computes any more."""
        live = {fp for g in graphs for fp in value_fingerprints(g).values()}
        self.entries = {k: v for k, v in self.entries.items() if k[1] in live}


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(value: Any, nodes: dict[fx.Node, str]) -> Any:
    if isinstance(value, fx.Node):
        return ("node", nodes[value])
    if isinstance(value, torch.Tensor):
        return ("tensor", tensor_token(value), value._version, tuple(value.shape), str(value.dtype))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_describe(v, nodes) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _describe(v, nodes)) for k, v in value.items()))
    return repr(value)


def _digest(desc: Any) -> str:
    return hashlib.blake2b(repr(desc).encode(), digest_size=16).hexdigest()
