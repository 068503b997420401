"""The Graph every pass reads and returns.

A ``Graph`` wraps a *flat* ``fx.GraphModule`` produced by ``torch.export``: positional
tensor inputs named ``input_names``, a tuple of tensor outputs named ``output_names``,
parameters reached by ``get_attr`` with their original dotted names, ATen ops whose
``meta["nn_module_stack"]`` keeps the module path of the layer that created them.

Passes never mutate a Graph: ``copy()`` gives a structural copy (new nodes, the same
tensors by reference), the pass edits that, and tensors are replaced, never written in place.
"""
from __future__ import annotations

import copy as _copy
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import fx
from torch.export import Dim

from splice.errors import SpliceError
from splice.ir.select import module_path, op_kind
from splice.kernels.registry import record

aten = torch.ops.aten

# Which argument of an ATen op holds which kind of stored tensor.
_ATEN_ROLES = {
    aten.linear.default: {1: "weight", 2: "bias"},
    aten.conv1d.default: {1: "weight", 2: "bias"},
    aten.conv2d.default: {1: "weight", 2: "bias"},
    aten.conv3d.default: {1: "weight", 2: "bias"},
    aten.convolution.default: {1: "weight", 2: "bias"},
    aten.embedding.default: {0: "weight"},
    aten.layer_norm.default: {2: "norm", 3: "norm"},
    aten._native_batch_norm_legit_no_training.default: {1: "norm", 2: "norm", 3: "norm", 4: "norm"},
    aten.batch_norm.default: {1: "norm", 2: "norm", 3: "norm", 4: "norm"},
}


def arg_roles(op) -> dict[int, str]:
    """Which argument of ``op`` holds which kind of stored tensor: ATen's table above, a splice
    op's registry record (``kernels/registry.py``; ``select`` has registered every op)."""
    roles = _ATEN_ROLES.get(op)
    if roles is None:
        rec = record(op)
        roles = rec.roles if rec is not None else {}
    return roles


def _gain_role(node: fx.Node, attr: fx.Node) -> str | None:
    """``norm`` when ``node`` multiplies the stored float vector ``attr`` onto another tensor's last axis."""
    if node.target != aten.mul.Tensor or len(node.args) != 2:
        return None
    other = node.args[1] if node.args[0] is attr else node.args[0]
    v, o = attr.meta.get("val"), getattr(other, "meta", {}).get("val")
    if other is attr or v is None or o is None or v.dim() != 1 or not v.is_floating_point() or o.dim() < 2:
        return None
    return "norm" if o.shape[-1] == v.shape[0] else None


_APPLY: list[Callable[..., "Graph"]] = []  # what Graph.apply runs: the pass manager's apply


def set_apply(fn: Callable[..., "Graph"]) -> None:
    """Plug in ``Graph.apply``'s implementation (``splice.passes.manager`` does, on import)."""
    _APPLY[:] = [fn]


_SAVE: list[Callable[..., Any]] = []  # what Graph.save runs: ir/artifact.py's save


def set_save(fn: Callable[..., Any]) -> None:
    """Plug in ``Graph.save``'s implementation (``splice.ir.artifact`` does, on import)."""
    _SAVE[:] = [fn]


@dataclass
class Graph:
    """A captured model: flat GraphModule plus its input/output spec and history."""

    gm: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    example_inputs: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # pruning masks by layer path (ir/sparsity.py)

    # ------------------------------------------------------------------ running
    def module(self) -> fx.GraphModule:
        """A runnable ``nn.Module``: ``module()(*inputs)`` returns a tuple in ``output_names`` order."""
        return self.gm

    def run(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Run on positional or named inputs; returns ``{output_name: tensor}``."""
        inputs = self.bind_inputs(args, kwargs)
        with torch.no_grad():
            outs = self.gm(*inputs)
        return dict(zip(self.output_names, outs))

    def sample_inputs(self, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """The example inputs resized to ``batch``/``seq`` on their dynamic axes 0 and 1, with
        values drawn like the example's (random ids in its range; constant masks kept)."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for name, ex in zip(self.input_names, self.example_inputs):
            axes = self.dynamic.get(name, {})
            shape = list(ex.shape)
            if 0 in axes and shape:
                shape[0] = batch
            if 1 in axes and len(shape) > 1:
                shape[1] = seq
            if ex.is_floating_point():
                t = torch.randn(shape, generator=gen).to(ex.dtype)
            elif ex.numel() == 0 or ex.dtype == torch.bool or bool(ex.min() == ex.max()):
                t = torch.full(shape, ex.reshape(-1)[0].item() if ex.numel() else 0, dtype=ex.dtype)
            else:
                t = torch.randint(int(ex.min()), int(ex.max()) + 1, shape, generator=gen).to(ex.dtype)
            out.append(t)
        return tuple(out)

    def bind_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        if kwargs:
            missing = [n for n in self.input_names[len(args):] if n not in kwargs]
            if missing:
                raise TypeError(f"missing inputs: {', '.join(missing)}")
            args = tuple(args) + tuple(kwargs[n] for n in self.input_names[len(args):])
        return tuple(args)

    # ---------------------------------------------------------------- structure
    def copy(self) -> "Graph":
        """Structural copy: new nodes and module tree, the same tensors."""
        new = fx.Graph()
        out = new.graph_copy(self.gm.graph, {})
        new.output(out)
        return Graph(rebuild_module(self.gm, new), list(self.input_names), list(self.output_names),
                     self.example_inputs, _copy.deepcopy(self.dynamic), dict(self.source),
                     list(self.history), dict(self.masks))

    def with_graph(self, gm: fx.GraphModule) -> "Graph":
        return Graph(gm, self.input_names, self.output_names, self.example_inputs, self.dynamic,
                     self.source, self.history, self.masks)

    def nodes(self, kind: str | None = None) -> Iterator[fx.Node]:
        for node in self.gm.graph.nodes:
            if kind is None or op_kind(node) == kind:
                yield node

    def tensor(self, target: str) -> torch.Tensor:
        return get_attr(self.gm, target)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor the graph reads, by ``get_attr`` target (shared ones once)."""
        return {n.target: get_attr(self.gm, n.target) for n in self.gm.graph.nodes if n.op == "get_attr"}

    def add_tensor(self, target: str, value: torch.Tensor, *, trainable: bool = False) -> fx.Node:
        """Store ``value`` under ``target`` (or ``target_1``… if taken) and return a new
        ``get_attr`` node for it, placed right after the graph's inputs."""
        name = _unique_target(self.gm, target)
        set_attr(self.gm, name, value, trainable=trainable)
        first = next(n for n in self.gm.graph.nodes if n.op != "placeholder")
        with self.gm.graph.inserting_before(first):
            return self.gm.graph.get_attr(name)

    def finalize(self) -> "Graph":
        """Drop dead nodes and tensors no longer read; recompile."""
        self.gm.graph.eliminate_dead_code()
        self.gm = rebuild_module(self.gm, self.gm.graph)
        return self

    # ------------------------------------------------------------------- sizes
    def param_roles(self) -> dict[str, str]:
        """Role of each stored tensor (``weight``, ``bias``, ``qweight``, ``scale``, ``norm`` …),
        taken from how the graph uses it; anything else is ``buffer``. A stored vector multiplied
        onto an activation along its last axis (a decomposed RMSNorm's gain, a layer scale) is ``norm``."""
        roles: dict[str, str] = {}
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            for i, arg in enumerate(node.args):
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    role = arg_roles(node.target).get(i) or _gain_role(node, arg)
                    if role and arg.target not in roles:
                        roles[arg.target] = role
        return {t: roles.get(t, "buffer") for t in self.tensors()}

    def bytes_by_role(self) -> dict[str, int]:
        """Bytes actually stored, by role (packed int4 counts half a byte per weight)."""
        out: Counter[str] = Counter()
        tensors = self.tensors()
        for target, role in self.param_roles().items():
            t = tensors[target]
            out[role] += t.numel() * t.element_size()
        return dict(out)

    def nbytes(self) -> int:
        return sum(self.bytes_by_role().values())

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def layers(self) -> list[dict[str, Any]]:
        """One row per linear/conv/embedding op: module path, op, kind, weight shape, bytes."""
        rows = []
        tensors = self.tensors()
        for node in self.gm.graph.nodes:
            kind = op_kind(node)
            if kind is None:
                continue
            attrs = [a.target for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
            rows.append({"path": module_path(node), "op": str(node.target).replace(".default", ""),
                         "kind": kind, "bytes": sum(tensors[t].numel() * tensors[t].element_size() for t in attrs),
                         "shape": tuple(tensors[attrs[0]].shape) if attrs else ()})
        return rows

    def op_counts(self) -> dict[str, int]:
        return dict(Counter(str(n.target).replace(".default", "") for n in self.gm.graph.nodes
                            if n.op == "call_function"))

    # ---------------------------------------------------------------- lowering
    def dynamic_shapes(self) -> tuple[dict[int, Any] | None, ...]:
        """``dynamic_shapes`` for ``torch.export`` over the flat inputs."""
        return tuple({axis: Dim.AUTO for axis in self.dynamic.get(n, {})} or None for n in self.input_names)

    def export_program(self) -> torch.export.ExportedProgram:
        """Re-export the current graph (for saving and for ONNX)."""
        return torch.export.export(self.gm, self.example_inputs, dynamic_shapes=self.dynamic_shapes(),
                                   strict=False)

    # -------------------------------------------------------------- user API
    def apply(self, *specs: str, calibration=None, verify: bool = True, datasets=None) -> "Graph":
        """Run passes given as ``name:key=val,...`` strings; returns the new Graph (``calibration``,
        and ``datasets``: further named calibration sets, for the passes that read them). The pass
        manager plugs itself in here (``set_apply``) when it is imported, as the API does."""
        if not _APPLY:
            raise SpliceError("Graph.apply: no pass manager loaded (import splice.passes.manager, or make the "
                              "graph with splice.capture / splice.load)")
        return _APPLY[0](self, *specs, calibration=calibration, verify=verify, datasets=datasets)

    def save(self, path, *, force: bool = False, delta_only: bool = False) -> None:
        """Save as an artifact directory (``ir/artifact.py`` plugs itself in here with ``set_save``
        when imported: the frontends import it, so every captured or loaded graph has it);
        ``delta_only``: a graph carrying deltas without its base tensors (``ir/deltas.py``)."""
        if not _SAVE:
            raise SpliceError("Graph.save: no artifact writer loaded (import splice.ir.artifact, or make the "
                              "graph with splice.capture / splice.load)")
        _SAVE[0](self, path, force=force, delta_only=delta_only)

    def __repr__(self) -> str:
        return (f"Graph({self.source.get('name', '?')}: {len(self.gm.graph.nodes)} nodes, "
                f"{self.num_params():,} params, {self.nbytes():,} bytes, passes={[h['pass'] for h in self.history]})")


# ---------------------------------------------------------------- module helpers


def rebuild_module(root: torch.nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A fresh GraphModule over ``graph`` that holds only the tensors ``graph`` reads,
    shared by reference with ``root``."""
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    for node in graph.nodes:
        if node.op == "get_attr" and not _has_attr(gm, node.target):
            value = get_attr(root, node.target)
            set_attr(gm, node.target, value, trainable=isinstance(value, torch.nn.Parameter) and value.requires_grad)
    gm.graph = graph
    gm.recompile()
    return gm


def get_attr(mod: torch.nn.Module, target: str):
    obj = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_attr(mod: torch.nn.Module, target: str) -> bool:
    try:
        get_attr(mod, target)
        return True
    except AttributeError:
        return False


def weights_digest(graph: "Graph") -> str:
    """SHA-256 over every stored tensor (name, dtype, shape, bytes), in name order: which weights
    a graph holds, whatever its structure (merging and deltas record their inputs' digests)."""
    h = hashlib.sha256()
    for name, t in sorted(graph.tensors().items()):
        t = t.detach().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def set_attr(mod: torch.nn.Module, target: str, value: torch.Tensor, *, trainable: bool = False) -> None:
    """Store a tensor at a dotted path, creating plain submodules on the way. Float tensors
    become parameters (trainable only if asked); integer data becomes a buffer."""
    *parents, leaf = target.split(".")
    for part in parents:
        child = getattr(mod, part, None)
        if child is None:
            child = torch.nn.Module()
            mod.add_module(part, child)
        mod = child
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    if isinstance(value, torch.nn.Parameter) and value.requires_grad == trainable:
        mod.register_parameter(leaf, value)  # shared as is
    elif value.is_floating_point():  # a new Parameter over the same storage: never flip a shared flag
        mod.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=trainable))
    else:
        mod.register_buffer(leaf, value)


def _unique_target(gm: fx.GraphModule, target: str) -> str:
    if not _has_attr(gm, target):
        return target
    i = 1
    while _has_attr(gm, f"{target}_{i}"):
        i += 1
    return f"{target}_{i}"


def attr_users(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """For each stored tensor, the op nodes that read it (tied weights have several)."""
    users: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            users[node.target].extend(node.users)
    return users
