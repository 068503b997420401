"""Coupling analysis: which channel axes of a Graph must shrink together.

``analyze(graph)`` propagates axis classes over the exported ATen graph (``ir/axes.py``,
``ir/axis_rules.py``) and turns each class that a stored tensor carries into a ``Group``: its
removable units (MLP channels, attention heads, KV heads with their query heads, conv channels,
the residual stream), every stored tensor axis it slices with the positions of each unit
(``Member.index``), the ops that read those tensors, and, when it cannot shrink, the op that pins
it. Everything is derived from ops and shapes; no module names or per-architecture tables.

Pruning shrinks groups (``ir/shrink.py``); permutation alignment and weight sharing can read the
same groups (a permutation of a group's units, applied to every member, leaves outputs unchanged).

    c = analyze(graph)
    print(c.describe())
    mlp = [g for g in c.groups if g.kind == "mlp"]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.axes import AxisState, Classes, Pin
from splice.ir.axis_rules import propagate
from splice.ir.graph import attr_users
from splice.ir.select import module_path

__all__ = ["Member", "Group", "Coupling", "Pin", "analyze"]


@dataclass(frozen=True)
class Member:
    """A stored tensor axis that a group slices: ``index[u]`` are the positions along ``axis`` of
    ``target`` that unit ``u`` owns (a KV head owns its query heads' rows of ``q_proj``)."""

    target: str
    axis: int
    index: torch.Tensor  # LongTensor [units, positions per unit]

    def __repr__(self) -> str:
        return f"Member({self.target}, axis={self.axis}, {tuple(self.index.shape)})"


@dataclass(frozen=True)
class Group:
    """Channel axes that shrink together.

    ``units`` removable units of ``unit`` channels each (``unit`` = head_dim for heads, 1 for
    channels; ``size = units * unit``); ``kind`` is derived from structure: ``mlp``, ``heads``,
    ``kv_heads``, ``head_dim``, ``residual``, ``hidden``, ``conv``, ``embedding``, ``spatial`` or
    ``channels``. Under GQA the query heads are a ``heads`` group whose ``parent`` is the
    ``kv_heads`` group, ``per_parent`` query heads per KV head. ``pinned_by`` says why the group
    cannot shrink (None if it can)."""

    id: int
    kind: str
    units: int
    unit: int
    members: tuple[Member, ...]
    ops: tuple[str, ...]
    modules: tuple[str, ...]
    pinned_by: Pin | None = None
    parent: int | None = None
    per_parent: int = 1

    @property
    def size(self) -> int:
        return self.units * self.unit

    @property
    def shrinkable(self) -> bool:
        return self.pinned_by is None

    def params_per_unit(self, tensors: dict[str, torch.Tensor]) -> int:
        """Stored elements one unit owns (over every member; a tensor the group slices on two
        axes counts both, so removing k units removes slightly less than k times this)."""
        return sum(tensors[m.target].numel() // tensors[m.target].shape[m.axis] * m.index.shape[1]
                   for m in self.members)

    def touches(self) -> str:
        """The modules whose ops read this group's tensors, compressed (``layers.0.mlp.{up,down}``)."""
        return summarize(self.modules)

    def describe(self) -> str:
        shape = f"{self.units}×{self.unit}" if self.unit > 1 else f"{self.units}"
        sub = f", {self.per_parent} per unit of #{self.parent}" if self.parent is not None else ""
        state = f"pinned: {self.pinned_by}" if self.pinned_by else "shrinkable"
        return f"#{self.id} {self.kind} {shape}{sub}, {len(self.members)} tensors, {self.touches()}: {state}"


@dataclass
class Coupling:
    """The groups of a Graph. Holds no fx nodes (names only), so it can be cached with the
    graph structure and stored tensor shapes it was computed from."""

    groups: list[Group]
    state: AxisState = field(repr=False)
    classes_of: dict[int, int] = field(repr=False)  # group id -> class root

    def group(self, gid: int) -> Group:
        return self.groups[gid]

    def of(self, target: str) -> list[Group]:
        """The groups that slice stored tensor ``target``."""
        return [g for g in self.groups if any(m.target == target for m in g.members)]

    def describe(self) -> str:
        return "\n".join(g.describe() for g in self.groups)

    __str__ = describe


def analyze(graph) -> Coupling:
    """The coupling groups of ``graph`` (deterministic: groups in order of first stored tensor)."""
    state = propagate(graph)
    cls = state.classes
    pins = _inherited_pins(state)
    coords = {(t, a): _coords(cls, c, cls.size[cls.find(c)])
              for t, axes in state.stored.items() for a, c in enumerate(axes) if c is not None}
    composites = _gqa_composites(cls)
    parents = {cls.find(p): r for r in range(len(cls.parent)) if cls.find(r) == r and cls.struct[r]
               for p in cls.struct[r][1]}
    kinds: dict[int, str] = {}
    order: list[int] = []
    for key, cmap in coords.items():
        for r in cmap:
            if r not in order and _is_group(cls, r, composites):
                kinds[r] = _kind(cls, r, composites, parents)
                if kinds[r] != "spatial":
                    order.append(r)
    users = attr_users(graph.gm)
    groups = []
    for gid, r in enumerate(order):
        members = tuple(Member(t, a, _unit_index(cmap[r], cls.size[r]))
                        for (t, a), cmap in coords.items() if r in cmap)
        readers = list(dict.fromkeys(n for m in members for n in users.get(m.target, [])))
        groups.append(Group(
            id=gid, kind=kinds[r], units=cls.size[r],
            unit=min(_block(m.index) for m in members), members=members,
            ops=tuple(n.name for n in readers), modules=tuple(dict.fromkeys(module_path(n) for n in readers)),
            pinned_by=pins.get(r) or _part_pin(cls, r, pins)))
    groups = _link_parents(groups, order, cls, composites)
    return Coupling(groups, state, {g.id: r for g, r in zip(groups, order)})


# ------------------------------------------------------------------------------ trees


def _coords(cls: Classes, c: int, n: int) -> dict[int, torch.Tensor]:
    """For an axis of class ``c`` with ``n`` positions: for ``c`` and every class in its
    structure, the coordinate of each position in that class (-1 where it is not in it)."""
    out: dict[int, torch.Tensor] = {}

    def visit(c: int, idx: torch.Tensor, depth: int) -> None:
        r = cls.find(c)
        prev = out.get(r)
        out[r] = idx if prev is None else torch.where(idx >= 0, idx, prev)
        s = cls.struct[r]
        if s is None or depth > 32:
            return
        kind, parts = s
        sizes = [cls.size[cls.find(p)] for p in parts]
        if kind == "prod":
            stride = 1
            for sz in sizes:
                stride *= sz
            for p, sz in zip(parts, sizes):
                stride //= sz
                visit(p, torch.where(idx >= 0, (idx // stride) % sz, -1), depth + 1)
        else:
            off = 0
            for p, sz in zip(parts, sizes):
                inside = (idx >= off) & (idx < off + sz)
                visit(p, torch.where(inside, idx - off, -1), depth + 1)
                off += sz

    visit(c, torch.arange(n), 0)
    return out


def _unit_index(coord: torch.Tensor, units: int) -> torch.Tensor:
    """[units, k]: the positions of each unit (every unit owns the same number); positions outside
    the class (coordinate -1: the other parts of a fused QKV axis) belong to no unit."""
    order = torch.argsort(coord, stable=True)  # positions grouped by unit, in order; the -1s first
    return order[int((coord < 0).sum()):].reshape(units, -1)


def _block(index: torch.Tensor) -> int:
    """Length of the first contiguous run of positions of unit 0 (its channels per unit)."""
    row = index[0]
    n = 1
    while n < len(row) and row[n] == row[n - 1] + 1:
        n += 1
    return n


def _inherited_pins(state: AxisState) -> dict[int, Pin]:
    """Pin of every class root: its own, or one of a class whose structure contains it."""
    cls = state.classes
    pins: dict[int, Pin] = {}
    seen: set[tuple[int, Pin | None]] = set()

    def visit(c: int, inherited: Pin | None, depth: int) -> None:
        r = cls.find(c)
        pin = cls.pin[r] or inherited
        if (r, pin) in seen or depth > 32:
            return
        seen.add((r, pin))
        if pin is not None and r not in pins:
            pins[r] = pin
        if cls.struct[r] is not None:
            for p in cls.struct[r][1]:
                visit(p, pin, depth + 1)

    for axes in list(state.values.values()) + list(state.stored.values()):
        for c in axes:
            if c is not None:
                visit(c, None, 0)
    return pins


def _part_pin(cls: Classes, r: int, pins: dict[int, Pin]) -> Pin | None:
    """A composite group (GQA query heads) cannot shrink if its KV or repeat part is pinned."""
    s = cls.struct[r]
    return next((pins[cls.find(p)] for p in s[1] if cls.find(p) in pins), None) if s else None


def _gqa_composites(cls: Classes) -> dict[int, int]:
    """Query-head classes of GQA: a product (KV heads × repeat), mapped to their KV class."""
    found = {}
    for r in range(len(cls.parent)):
        s = cls.struct[r] if cls.find(r) == r else None
        if s and s[0] == "prod" and len(s[1]) == 2 and cls.repeat[cls.find(s[1][1])] and "heads" in cls.tags[r]:
            found[r] = cls.find(s[1][0])
    return found


def _is_group(cls: Classes, r: int, composites: dict[int, int]) -> bool:
    if cls.size[r] < 2:
        return False
    return r in composites or (cls.struct[r] is None and not cls.repeat[r])


def _kind(cls: Classes, r: int, composites: dict[int, int], parents: dict[int, int]) -> str:
    """A label from structural evidence (attention, norms, residual adds, convs, embeddings); a
    class with no evidence of its own takes its enclosing class's (RoPE's frequencies: head_dim)."""
    tags, writers = cls.tags[r], cls.writers[r]
    pin = cls.pin[r]
    if r in composites or "heads" in tags:
        return "heads"
    if r in composites.values():
        return "kv_heads"
    if "head_dim" in tags:
        return "head_dim"
    if "vocab" in tags:
        return "embedding"
    if "add" in tags and len(writers) >= 2:
        return "residual"
    if "norm" in tags:
        return "hidden"
    if "conv" in tags or "batch_norm" in tags:
        return "conv"
    if "contracted" in tags and writers:
        return "mlp"
    if pin is not None and pin.why.startswith("spatial"):
        return "spatial"
    if r in parents and parents[r] != r:
        return _kind(cls, parents[r], composites, {k: v for k, v in parents.items() if k != r})
    return "channels"


def _link_parents(groups: list[Group], order: list[int], cls: Classes, composites: dict[int, int]) -> list[Group]:
    """Give each GQA query-head group its KV-head group as parent."""
    gid = {r: g.id for g, r in zip(groups, order)}
    out = []
    for g, r in zip(groups, order):
        kv = composites.get(r)
        if kv is not None and kv in gid:
            g = Group(**{**g.__dict__, "parent": gid[kv], "per_parent": cls.size[r] // cls.size[kv]})
        out.append(g)
    return out


def summarize(paths) -> str:
    """Module paths compressed to a common prefix and their distinct tails; layer numbers become
    ``*`` when that makes the list short."""
    raw = [p or "(top)" for p in dict.fromkeys(paths)]
    starred = list(dict.fromkeys(".".join("*" if s.isdigit() else s for s in p.split(".")) for p in raw))
    short = _compress(raw)
    return short if len(raw) <= 4 or len(starred) == len(raw) else _compress(starred)


def _compress(paths: list[str]) -> str:
    if len(paths) <= 1:
        return paths[0] if paths else "—"
    split = [p.split(".") for p in paths]
    n = 0
    while all(len(s) > n + 1 for s in split) and len({s[n] for s in split}) == 1:
        n += 1
    prefix = ".".join(split[0][:n])
    tails = list(dict.fromkeys(".".join(s[n:]) for s in split))
    inner = ",".join(tails) if len(tails) <= 4 else f"{','.join(tails[:3])},…{len(tails) - 3} more"
    return f"{prefix}.{{{inner}}}" if prefix else f"{{{inner}}}"
