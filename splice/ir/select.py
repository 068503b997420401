"""Target selection shared by every pass.

An expression is ``|``-separated terms; a term prefixed with ``!`` excludes. A term is

* an op kind: ``linear``, ``conv``, ``embedding`` (or ``all``);
* a module-path glob (``model.layers.*.mlp.*``), matched against the whole path or any
  dotted suffix, so ``q_proj`` or ``*_proj`` work as in PEFT's ``target_modules``;
* a regular expression ``re:<pattern>`` (full match on the module path).

A node is selected when its kind is one the pass handles, it matches some positive term
(no positive term means every such node), and it matches no excluded term. Examples:
``linear|embedding``, ``linear|!lm_head``, ``re:.*\\.(q|v)_proj``.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import fx

from splice.errors import ConfigError
from splice.kernels import families  # noqa: F401  (registers every splice op before a kind is read)
from splice.kernels.registry import record

aten = torch.ops.aten

ATEN_KINDS = {
    aten.linear.default: "linear",
    aten.conv1d.default: "conv",
    aten.conv2d.default: "conv",
    aten.conv3d.default: "conv",
    aten.convolution.default: "conv",
    aten.embedding.default: "embedding",
}
KIND_NAMES = ("linear", "conv", "embedding", "all")


def op_kind(node: fx.Node) -> str | None:
    """The kind of an ATen op (``ATEN_KINDS``) or of a splice op (its registry record:
    ``splice::qlinear`` is a ``linear``); None for every other node."""
    if node.op != "call_function":
        return None
    kind = ATEN_KINDS.get(node.target)
    if kind is None and (rec := record(node.target)) is not None:
        kind = rec.kind
    return kind


def module_path(node: fx.Node) -> str:
    """The dotted path of the module that created ``node`` (``model.layers.0.mlp.up_proj``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else str(path)


@dataclass(frozen=True)
class _Term:
    text: str
    negate: bool

    def matches(self, kind: str, path: str) -> bool:
        t = self.text
        if t in KIND_NAMES:
            return t == "all" or t == kind
        if t.startswith("re:"):
            return re.fullmatch(t[3:], path) is not None
        return fnmatch.fnmatchcase(path, t) or fnmatch.fnmatchcase(path, "*." + t)


@dataclass(frozen=True)
class Selector:
    expr: str
    terms: tuple[_Term, ...]

    def matches(self, kind: str, path: str) -> bool:
        pos = [t for t in self.terms if not t.negate]
        neg = [t for t in self.terms if t.negate]
        if pos and not any(t.matches(kind, path) for t in pos):
            return False
        return not any(t.matches(kind, path) for t in neg)


def _split_terms(expr: str) -> list[str]:
    """Split on ``|`` outside brackets, so ``re:.*\\.(q|v)_proj`` stays one term."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "|" and depth <= 0:
            terms.append(expr[start:i])
            start = i + 1
    return terms + [expr[start:]]


def parse_targets(expr: str) -> Selector:
    """Parse and validate a target expression; raises ValueError naming the bad term."""
    terms = []
    for raw in _split_terms(expr):
        text = raw.strip()
        negate = text.startswith("!")
        text = text[1:].strip() if negate else text
        if not text:
            raise ValueError(f"targets: empty term in {expr!r}")
        if text.startswith("re:"):
            try:
                re.compile(text[3:])
            except re.error as e:
                raise ValueError(f"targets: bad regex {text[3:]!r}: {e}") from None
        terms.append(_Term(text, negate))
    return Selector(expr, tuple(terms))


def select_nodes(gm: fx.GraphModule, expr: str, kinds: tuple[str, ...], pass_name: str) -> list[fx.Node]:
    """Nodes of ``kinds`` matching ``expr``; an expression that matches nothing is an error."""
    sel = parse_targets(expr)
    found = []
    for node in gm.graph.nodes:
        kind = op_kind(node)
        if kind in kinds and sel.matches(kind, module_path(node)):
            found.append(node)
    if not found:
        raise ConfigError(f"{pass_name}: targets '{expr}' matched no {'/'.join(kinds)} layer")
    return found


def validate_targets(expr: str) -> None:
    """For config ``__post_init__``: raise ValueError on a malformed expression."""
    parse_targets(expr)
