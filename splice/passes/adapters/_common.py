"""The adapter framework every adapter pass shares.

An adapter is a named set of tensors beside a targeted layer. The layer's own op (the *base*:
``aten.linear`` or ``splice::qlinear``, so adapters compose with quantization QLoRA-style) stays;
a *delta op* reads the layer's input and its output is added to the base's::

    y = linear(x, W, b)                       # or splice::qlinear(x, q, s, z, b, bits, g)
    d = splice::lora_delta(x, A, B, scale)    # one delta op per adapter
    out = aten.add(y, d)                      # several adapters chain: add(add(y, d1), d2)

A method may also read the base's output and its float weight/bias (``Method.reads``): DoRA's
delta is ``op(x, y, W, b, A, B, m, ...)``, SSF's ``op(y, ...)``. Every delta reads the *base*
output ``y``, not the chain, so adapters stay independent and fold together exactly. Such
methods fold through ``Method.affine`` (the update as a function of the base ``W``/``b``, bias
included); the fold then keeps the base's original tensors so unfold restores them exactly.

A *recomputing* method (``Method.recomputes``: IA3, MiSS's Bat) computes the layer's whole output
the way PEFT does (``y·l``, ``linear(x·l, W, b)``, ``linear(x, W + ΔW, b)``), so the two agree
bit for bit instead of to rounding. Its op reads ``y`` first and its result takes ``y``'s place at
the head of the chain (at most one per layer); the other deltas still read ``y``::

    y = linear(x, W, b);  h = splice::ia3_scale(y, l, scale);  out = aten.add(h, d)

Tensors are stored as ``<module path>.adapters.<name>.<key>`` (``...q_proj.adapters.default.A``);
the trainable ones (role ``adapter``) are created with ``requires_grad`` so a training loop picks
them up, everything else stays frozen. ``scale`` is a 0-d tensor: changing an adapter's weight or
switching it off rewrites that tensor, never the graph. The per-adapter hyperparameters (rank,
alpha, dropout, weight, active …) are JSON in the delta node's ``meta["custom"]`` (kept by save/load);
the dropout is also marked on the delta for the training loop (``ir/train_hooks.set_input_dropout``).

A *method* (``Method``) names its delta op, the order of its tensors and how to turn them into a
dense ``[out, in]`` update for folding. Base ops are handled by ``passes/adapters/_base.py``.
Every method's ``scale`` is the 0-d factor on its whole delta (``meta["scaling"] × weight``, 0
when inactive), so weighting and switching work the same for all of them.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import module_path, validate_targets
from splice.ir.train_hooks import set_input_dropout
from splice.passes.base import PassConfig

ADD = torch.ops.aten.add.Tensor
FOLDED = torch.ops.splice.folded_adapter.default
META_KEY = "splice_adapter"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TENSOR = re.compile(r"^(?P<path>.+)\.adapters\.(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.[^.]+$")


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"name must be an identifier (letters, digits, _), got {name!r}")


def check_rank(who: str, rank: int, path: str, out_f: int, in_f: int) -> None:
    """ConfigError when ``rank`` exceeds the smaller side of the ``out_f × in_f`` layer at ``path``."""
    if rank > min(out_f, in_f):
        raise ConfigError(f"{who}: rank {rank} exceeds min(in, out) = {min(out_f, in_f)} of layer "
                          f"'{path}' ({in_f} -> {out_f})")


def check_rank_dropout(rank: int, dropout: float) -> None:
    """The ``__post_init__`` checks of adapter configs that have a rank and an input dropout."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


# the report fields of every pass that attaches adapters (``report_fields=``)
ADAPTER_REPORT = {"adapter": "adapter name", "layers": "layers adapted", "trainable_params": "trainable parameters"}


@dataclass(frozen=True, kw_only=True)
class AdapterConfig(PassConfig):
    """Fields every adapter pass takes."""

    name: str = field(default="default", metadata={"help": "adapter name; adapters with different names share a layer"})
    targets: str = field(default="linear|!lm_head", metadata={
        "help": "layers: kind linear, path globs (q_proj|v_proj), re:, !exclude; default all linear but lm_head"})

    def __post_init__(self):
        check_name(self.name)
        validate_targets(self.targets)


def adapter_passes() -> dict[str, bool]:
    """Every registered adapter pass (its config an ``AdapterConfig``) → whether it reads a second,
    fine-tuned model (option ``source``, e.g. ``adapter.extract``) instead of inserting an adapter
    from the graph alone."""
    from splice.passes.base import list_passes

    return {p.name: "source" in {f.name for f in p.config_cls.options()}
            for p in list_passes() if p.name.startswith("adapter.") and issubclass(p.config_cls, AdapterConfig)}


@dataclass(frozen=True)
class Method:
    """One adapter kind: its delta op ``op(x, *tensors[keys])`` and its dense ``[out, in]`` update."""

    name: str
    op: Any
    keys: tuple[str, ...]
    trainable: tuple[str, ...]
    delta_weight: Callable[..., torch.Tensor]  # (tensors), or (tensors, (out, in)) when ``shaped``
    base_args: Callable[[fx.Node], tuple] = lambda base: ()  # non-tensor op args read off the base (conv stride …)
    shaped: bool = False  # the update depends on the layer's size, not only on the tensors (VeRA, Bone)
    # base values the op takes before its tensors: "x" (input), "out" (base output), "weight", "bias"
    reads: tuple[str, ...] = ("x",)
    # the fold update from the base's float (W [out, in], b [out] or None): (ΔW, Δb or None);
    # set for methods whose update depends on the base (then ``delta_weight`` is None)
    affine: Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None],
                     tuple[torch.Tensor, torch.Tensor | None]] | None = None
    # the op returns the layer's output (reads start with "out"), not a delta to add to it
    recomputes: bool = False

    def dense(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The dense ``[out, in]`` update of this adapter on a layer of ``shape``."""
        return self.delta_weight(tensors, shape) if self.shaped else self.delta_weight(tensors)


METHODS: dict[Any, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.op] = method
    return method


def method_named(name: str) -> Method:
    return next(m for m in METHODS.values() if m.name == name)


def layer_path(node: fx.Node) -> str:
    return module_path(node) or node.name


def read_meta(node: fx.Node) -> dict[str, Any]:
    return json.loads(node.meta.get("custom", {}).get(META_KEY, "{}"))


def write_meta(node: fx.Node, meta: dict[str, Any]) -> None:
    """Replace (never mutate: copies share meta dicts) the node's adapter metadata."""
    node.meta["custom"] = {**node.meta.get("custom", {}), META_KEY: json.dumps(meta, sort_keys=True)}


@dataclass
class Site:
    """One (unfolded) adapter on one base op."""

    name: str
    path: str
    method: Method
    delta: fx.Node
    add: fx.Node | None  # None for a recomputing method (its op is the chain's head)
    base: fx.Node

    @property
    def meta(self) -> dict[str, Any]:
        return read_meta(self.delta)

    def nodes(self) -> dict[str, fx.Node]:
        return dict(zip(self.method.keys, self.delta.args[len(self.method.reads):]))

    def tensors(self, graph: Graph) -> dict[str, torch.Tensor]:
        return {k: graph.tensor(n.target) for k, n in self.nodes().items()}


def _is_delta(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in METHODS


def _recomputes(node: Any) -> bool:
    return _is_delta(node) and METHODS[node.target].recomputes


def chain_base(node: fx.Node) -> fx.Node:
    """Walk back from an adapter ``add`` (or the chain's head, or the base itself) to the base op."""
    while node.target == ADD and _is_delta(node.args[1]):
        node = node.args[0]
    return node.args[0] if _recomputes(node) else node


def chain_head(base: fx.Node) -> fx.Node:
    """The recomputing adapter op on ``base`` (``base`` itself when there is none)."""
    return next((u for u in base.users if _recomputes(u) and u.args[0] is base), base)


def chain_end(base: fx.Node) -> fx.Node:
    """The last ``add`` of the adapters on ``base`` (its head when it has none)."""
    node = chain_head(base)
    while True:
        nxt = next((u for u in node.users if u.target == ADD and u.args[0] is node and _is_delta(u.args[1])), None)
        if nxt is None:
            return node
        node = nxt


def _tensor_name(delta: fx.Node) -> re.Match:
    """Layer path and adapter name of a delta op, read off its first adapter tensor's name."""
    return _TENSOR.match(delta.args[len(METHODS[delta.target].reads)].target)


def sites(graph: Graph) -> list[Site]:
    """Every unfolded adapter of ``graph``, in graph order."""
    out = []
    for node in graph.gm.graph.nodes:
        if not _is_delta(node):
            continue
        method = METHODS[node.target]
        m = _tensor_name(node)
        add = None if method.recomputes else next(u for u in node.users if u.target == ADD)
        out.append(Site(m["name"], m["path"], method, node, add, chain_base(node if add is None else add.args[0])))
    return out


@dataclass
class Record:
    """A fold record (``splice::folded_adapter``): what ``adapter.unfold`` restores."""

    node: fx.Node
    spec: dict[str, Any]

    @property
    def base(self) -> fx.Node:
        return chain_base(self.node.args[0])

    def adapter_nodes(self) -> list[tuple[dict[str, Any], dict[str, fx.Node]]]:
        """(adapter entry of the spec, key -> tensor node) per folded adapter."""
        args, i, out = list(self.node.args[1]), 0, []
        for entry in self.spec["adapters"]:
            keys = method_named(entry["method"]).keys
            out.append((entry, dict(zip(keys, args[i:i + len(keys)]))))
            i += len(keys)
        return out

    def originals(self) -> dict[str, fx.Node]:
        args = list(self.node.args[1])
        return dict(zip(self.spec["originals"], args[len(args) - len(self.spec["originals"]):]))


def records(graph: Graph) -> list[Record]:
    return [Record(n, json.loads(n.args[2])) for n in graph.gm.graph.nodes if n.target == FOLDED]


def taken_names(graph: Graph) -> set[tuple[str, str]]:
    """(layer path, adapter name) of every adapter, unfolded or folded."""
    names = {(s.path, s.name) for s in sites(graph)}
    names |= {(r.spec["path"], a["name"]) for r in records(graph) for a in r.spec["adapters"]}
    return names


def free_layer_path(who: str, node: fx.Node, name: str, taken: set[tuple[str, str]]) -> str:
    """``node``'s layer path, after checking that no adapter in ``taken`` (``taken_names``) has ``name`` there."""
    path = layer_path(node)
    if (path, name) in taken:
        raise ConfigError(f"{who}: layer '{path}' already has an adapter named '{name}'; choose another name")
    return path


def attach(graph: Graph, base: fx.Node, name: str, method: Method,
           tensors: dict[str, torch.Tensor | fx.Node], meta: dict[str, Any]) -> dict[str, fx.Node]:
    """Add adapter ``name`` beside ``base`` (in place on the pass's copy). Tensors given as
    values are stored under ``<path>.adapters.<name>.<key>``; nodes are reused (shared)."""
    path = layer_path(base)
    if method.recomputes and (head := chain_head(base)) is not base:
        raise ConfigError(f"{method.name} adapter '{name}': layer '{path}' already has adapter "
                          f"'{_tensor_name(head)['name']}' ({METHODS[head.target].name}), which "
                          "recomputes the layer too; one such adapter per layer (fold it first)")
    nodes = {k: t if isinstance(t, fx.Node) else
             graph.add_tensor(f"{path}.adapters.{name}.{k}", t, trainable=k in method.trainable)
             for k, t in tensors.items()}
    end = base if method.recomputes else chain_end(base)
    fxg = graph.gm.graph
    with fxg.inserting_after(end):
        delta = fxg.call_function(method.op, (*base_operands(base, method.reads), *[nodes[k] for k in method.keys],
                                              *method.base_args(base)))
    new = [delta]
    if not method.recomputes:
        with fxg.inserting_after(delta):
            new.append(fxg.call_function(ADD, (end, delta)))
    for n in new:
        n.meta["nn_module_stack"] = base.meta.get("nn_module_stack", {})
    write_meta(delta, {"method": method.name, **meta})
    set_input_dropout(delta, float(meta.get("dropout") or 0.0))  # the training loop reads it from the IR
    end.replace_all_uses_with(new[-1], delete_user_cb=lambda u: u not in new and not _is_delta(u) and u.target != FOLDED)
    return nodes


def base_operands(base: fx.Node, reads: tuple[str, ...]) -> list:
    """The base values a delta op reads: input, output, and (``aten.linear`` layout) weight, bias."""
    values = {"x": base.args[0], "out": base, "weight": base.args[1],
              "bias": base.args[2] if len(base.args) > 2 else None}
    return [values[r] for r in reads]


def refresh_reads(base: fx.Node) -> None:
    """Point the deltas on ``base`` at its current operands (fold/unfold may have given the base
    new weight or bias tensors; a delta reading them must see what the base computes with)."""
    node = chain_end(base)
    while node is not base:
        delta = node if _recomputes(node) else node.args[1]
        reads = METHODS[delta.target].reads
        delta.args = (*base_operands(base, reads), *delta.args[len(reads):])
        node = node.args[0]


def detach(graph: Graph, site: Site) -> None:
    """Remove the delta op and its add (its tensors go when nothing reads them)."""
    if site.add is not None:
        site.add.replace_all_uses_with(site.add.args[0])
        graph.gm.graph.erase_node(site.add)
    else:
        site.delta.replace_all_uses_with(site.base)
    graph.gm.graph.erase_node(site.delta)


def unknown_adapter(who: str, name: str, graph: Graph) -> ConfigError:
    have = sorted({n for _, n in taken_names(graph)})
    return ConfigError(f"{who}: no adapter named '{name}' in the graph (adapters: {', '.join(have) or 'none'})")
