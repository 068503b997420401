"""Axis classes: a union-find over the channel axes of every value in a Graph.

Every axis of a fixed size > 1 (an op's output, a stored tensor, a graph input) starts as its own
*class*; per-op rules unify the classes that must keep the same channels in the same order
(``linear`` joins its input's last axis with ``W[:, k]`` and its output's with ``W[n, :]``,
elementwise ops join broadcast-aligned axes, ``transpose`` permutes, ...). A class may carry a
*structure* over its positions:

* ``("prod", [a, b, ...])``: row-major product, e.g. a reshape of 64 channels into 4 heads × 16;
* ``("cat", [a, b, ...])``: concatenation, e.g. a fused qkv projection split in three.

A class created by broadcasting a size-1 axis (``expand``: GQA's ``repeat_kv``, or SDPA's
``enable_gqa``) is a *repeat* class. An axis that cannot shrink is *pinned*, with the op that pins
it (``Pin``). Dynamic (symbolic) axes and axes of size 1 carry no class. The rules read ATen ops and
the shapes in ``node.meta["val"]`` only, never module names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class Pin:
    """Why an axis cannot shrink: the node, its op and module path, and the reason."""

    node: str
    op: str
    module: str
    why: str

    def __str__(self) -> str:
        where = f" in {self.module}" if self.module else ""
        return f"{self.why} ({self.node}: {self.op}{where})"


class Classes:
    """Union-find over axis classes with sizes, structures, pins, tags and writers."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.struct: list[tuple[str, list[int]] | None] = []
        self.pin: list[Pin | None] = []
        self.repeat: list[bool] = []
        self.tags: list[set[str]] = []
        self.writers: list[set[str]] = []
        self.context: Pin | None = None  # the node being processed, for pins raised by unions

    def new(self, size: int, *, repeat: bool = False, struct=None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.struct.append(struct)
        self.pin.append(None)
        self.repeat.append(repeat)
        self.tags.append(set())
        self.writers.append(set())
        return len(self.parent) - 1

    def find(self, c: int) -> int:
        while self.parent[c] != c:
            self.parent[c] = self.parent[self.parent[c]]
            c = self.parent[c]
        return c

    def structure(self, c: int):
        return self.struct[self.find(c)]

    def pin_class(self, c: int, why: str) -> None:
        r = self.find(c)
        if self.pin[r] is None:
            ctx = self.context
            self.pin[r] = Pin(ctx.node, ctx.op, ctx.module, why) if ctx else Pin("", "", "", why)

    def tag(self, c: int | None, tag: str) -> None:
        if c is not None:
            self.tags[self.find(c)].add(tag)

    def union(self, a: int | None, b: int | None) -> None:
        """Make ``a`` and ``b`` one class (their structures unify part by part)."""
        if a is None or b is None:
            return
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] != self.size[b]:
            self.pin_class(a, f"sizes {self.size[a]} and {self.size[b]} meet")
            self.pin_class(b, f"sizes {self.size[a]} and {self.size[b]} meet")
            return
        sa, sb = self.struct[a], self.struct[b]
        self.parent[b] = a
        self.pin[a] = self.pin[a] or self.pin[b]
        self.repeat[a] = self.repeat[a] or self.repeat[b]
        self.tags[a] |= self.tags[b]
        self.writers[a] |= self.writers[b]
        if sa is None:
            self.struct[a] = sb
        elif sb is not None:
            self._unify_structs(a, sa, sb)

    def _unify_structs(self, root: int, sa, sb) -> None:
        (ka, pa), (kb, pb) = sa, sb
        if ka == kb == "prod":
            if not self.match(pa, pb):
                self.pin_class(root, "incompatible head layouts")
        elif ka == kb == "cat" and [self.size[self.find(p)] for p in pa] == [self.size[self.find(p)] for p in pb]:
            for x, y in zip(pa, pb):
                self.union(x, y)
        else:
            self.pin_class(root, "incompatible channel layouts")

    def compose(self, parts: list[int]) -> int:
        """A new class: the row-major product of ``parts``."""
        n = 1
        for p in parts:
            n *= self.size[self.find(p)]
        return self.new(n, struct=("prod", list(parts)))

    def _factor(self, c: int, first: int) -> list[int] | None:
        """``c`` as a product whose first part has ``first`` channels (splitting a plain class)."""
        r = self.find(c)
        s = self.struct[r]
        if s is not None:
            return list(s[1]) if s[0] == "prod" else None
        if self.size[r] % first:
            return None
        parts = [self.new(first), self.new(self.size[r] // first)]
        self.struct[r] = ("prod", parts)
        return parts

    def match(self, xs: list[int], ys: list[int]) -> bool:
        """Unify two row-major sequences of classes with equal total size (a reshape), factoring
        classes where one side splits what the other keeps whole. False if not expressible."""
        xs, ys = list(xs), list(ys)
        while xs and ys:
            x, y = xs.pop(0), ys.pop(0)
            sx, sy = self.size[self.find(x)], self.size[self.find(y)]
            if sx == sy:
                self.union(x, y)
                continue
            big, small, rest, other = (x, sy, xs, ys) if sx > sy else (y, sx, ys, xs)
            parts = self._factor(big, small)
            if not parts or len(parts) < 2:
                return False
            rest[:0] = parts
            other.insert(0, y if big is x else x)
        return not xs and not ys


# ---------------------------------------------------------------------------- shapes


def _dims(val) -> tuple:
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def is_channel(d) -> bool:
    """A fixed size > 1: the axes the analysis tracks."""
    return isinstance(d, int) and d > 1


def _expr(d):
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d)


@dataclass
class AxisState:
    """The result of propagation: classes, and the class of each axis of each value (None for
    dynamic or size-1 axes). ``values`` is keyed by (node name, output index); ``stored`` by
    ``get_attr`` target."""

    classes: Classes = field(default_factory=Classes)
    values: dict[tuple[str, int], list[int | None]] = field(default_factory=dict)
    stored: dict[str, list[int | None]] = field(default_factory=dict)


def reshape_segments(ins: tuple, outs: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input and output axes with equal products (sizes may be symbolic), e.g.
    (B, S, 64) -> (B·S, 4, 16) gives ([0, 1], [0]), ([2], [1, 2]). None if not found."""
    segs, i, j = [], 0, 0
    while i < len(ins) or j < len(outs):
        a, b, pa, pb = [], [], sympy.Integer(1), sympy.Integer(1)
        while True:
            if a and b and sympy.simplify(pa - pb) == 0:
                # absorb trailing size-1 axes into this segment
                while i < len(ins) and ins[i] == 1 and not (j < len(outs) and outs[j] == 1):
                    a.append(i)
                    i += 1
                while j < len(outs) and outs[j] == 1 and not (i < len(ins) and ins[i] == 1):
                    b.append(j)
                    j += 1
                break
            if i >= len(ins) and j >= len(outs):
                break
            if j >= len(outs) or (i < len(ins) and _smaller(pa, pb, bool(a), bool(b))):
                if i >= len(ins):
                    return None
                pa *= _expr(ins[i])
                a.append(i)
                i += 1
            else:
                pb *= _expr(outs[j])
                b.append(j)
                j += 1
        if not a and not b:
            break
        segs.append((a, b))
    return segs


def _smaller(pa, pb, has_a: bool, has_b: bool) -> bool:
    """Whether the input side's product is the one to grow next."""
    if not has_a:
        return True
    if not has_b:
        return False
    ratio = sympy.simplify(pb / pa)
    num, den = ratio.as_numer_denom()
    return den == 1 and ratio != 1
