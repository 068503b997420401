"""``quantize.rotate``: rotate a decoder's residual stream by an orthogonal (Hadamard) matrix
folded into the adjacent weights, so outliers spread across channels before quantization;
the rotated graph computes the same function (fp32: to rounding).
QuaRot https://arxiv.org/abs/2404.00456 (its offline rotation ``Q``, "R1"); HALO
https://arxiv.org/abs/2501.02625 applies the same rotations to training.

With the residual stream ``h`` replaced by ``h Q`` everywhere:

* token embeddings ``E -> E Q`` (a table tied to the LM head is untied: the head gets its own);
* linears that write into the stream (their output is added to it: ``o_proj``, ``down_proj``)
  ``W -> Qᵀ W``, bias ``b -> b Q``;
* RMSNorms commute with ``Q`` (``‖h Q‖ = ‖h‖``) once their weight ``g`` is folded into the
  linears that read them: ``W -> W diag(g) Q`` (q/k/v, gate/up, the LM head), and the norm's
  ``mul(g, ·)`` is dropped.

``Q`` is a normalized Hadamard matrix with random row signs (QuaRot's randomized Hadamard;
``random_signs=false`` for the plain one), built for any order ``_hadamard.py`` reaches
(2^k, 12·2^k, 72·2^k … — SmolLM2's 576 = 72·8), else a seeded random orthogonal matrix; the
report says which. Only the stream is rotated (no online rotations, no per-head value/output
rotation), so inputs of ``o_proj``/``down_proj`` keep their outliers.

The stream is found from the graph, not from per-architecture tables: it starts at every
``aten.embedding`` and continues through dtype casts and residual ``add``s of linear outputs;
it may be read only by RMSNorms (``x · rsqrt(mean(x², -1) + ε)`` then ``mul(g, ·)``, or
``aten.rms_norm``) whose outputs reach only linears (through views/slices keeping the last dim).
Anything else is refused with a one-line error naming the op and layer: LayerNorm (GPT-2, BERT,
ViT: its mean subtraction and bias do not commute with a rotation), a stream that is a model
output (encoders' hidden states), no embedding (vision/CNN models), quantized layers
(rotate the float model, then quantize).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph, attr_users, set_attr
from splice.ir.select import module_path, op_kind
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass
from splice.passes.quantize._common import check_not_quantized
from splice.passes.quantize._hadamard import rotation
from splice.passes.quantize._smooth import is_last_dim, last_dim

NAME = "quantize.rotate"
aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.alias.default,
          aten.detach.default, aten.contiguous.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SLICES = {aten.slice.Tensor, aten.select.int}
SUPPORTED = "rotate supports decoders with RMSNorm (Llama, Qwen2, Mistral …)"


@dataclass(frozen=True, kw_only=True)
class RotateConfig(PassConfig):
    """Hadamard rotation of the residual stream folded into embeddings/linears (QuaRot); output-preserving."""

    random_signs: bool = field(default=True, metadata={"help": "random ±1 row signs on the Hadamard matrix (QuaRot)"})


@dataclass
class _Norm:
    out: fx.Node  # the norm's output the readers see (the mul by g, or the rms_norm op)
    weight: fx.Node | None  # get_attr of g
    readers: list[fx.Node] = field(default_factory=list)


@dataclass
class _Stream:
    roots: list[fx.Node]  # embedding ops
    writers: list[fx.Node] = field(default_factory=list)  # linears added into the stream
    norms: list[_Norm] = field(default_factory=list)


def _where(node: fx.Node) -> str:
    return f"{str(node.target).replace('.default', '')} at '{module_path(node) or node.name}'"


def _is_cast(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _CASTS or (
        node.target == aten.dropout.default and not (len(node.args) > 2 and node.args[2])))


def _single(node: fx.Node, target) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].target == target else None


def _rms_chain(x: fx.Node, pow_node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``pow(x, 2) -> mean(-1, keepdim) -> add(ε) -> rsqrt -> mul(x, ·)``: (that mul, the rsqrt)."""
    if pow_node.args[1] != 2:
        return None
    mean = _single(pow_node, aten.mean.dim)
    if mean is None or is_last_dim(x, mean.args[1][0]) is not True or len(mean.args[1]) != 1 \
            or not (len(mean.args) > 2 and mean.args[2]):
        return None
    add = _single(mean, aten.add.Tensor)
    rsqrt = add and _single(add, aten.rsqrt.default)
    normed = rsqrt and _single(rsqrt, aten.mul.Tensor)
    return (normed, rsqrt) if normed is not None and set(normed.args) == {x, rsqrt} else None


def _norm_weight(normed: fx.Node) -> _Norm:
    """Past casts, ``mul(g, ·)`` with ``g`` a stored ``[D]`` vector, if present."""
    node = normed
    while len(node.users) == 1 and _is_cast(next(iter(node.users))):
        node = next(iter(node.users))
    if len(node.users) == 1:
        mul = next(iter(node.users))
        g = next((a for a in mul.args if isinstance(a, fx.Node) and a.op == "get_attr"), None)
        if mul.target == aten.mul.Tensor and g is not None and node in mul.args and last_dim(g) == last_dim(node) \
                and g.meta["val"].dim() == 1:
            return _Norm(mul, g)
    return _Norm(node, None)


def _readers(norm: _Norm) -> None:
    """The linears reading ``norm.out`` through views/slices that keep the last dim."""
    frontier = [norm.out]
    while frontier:
        v = frontier.pop()
        for u in v.users:
            if op_kind(u) == "linear" and u.args[0] is v:
                check_not_quantized(u, NAME)
                norm.readers.append(u)
            elif _is_cast(u) or (u.target in _VIEWS and last_dim(u) == last_dim(v)) \
                    or (u.target in _SLICES and is_last_dim(v, u.args[1]) is False):
                frontier.append(u)
            else:
                raise ConfigError(f"{NAME}: a normalized residual stream is read by {_where(u)}, not a linear; {SUPPORTED}")


def _writer(v: fx.Node) -> fx.Node:
    """The linear whose output ``v`` is (through casts and views keeping the last dim)."""
    node = v
    while _is_cast(node) or (node.target in _VIEWS and last_dim(node) == last_dim(node.args[0])):
        node = node.args[0]
    if op_kind(node) != "linear":
        raise ConfigError(f"{NAME}: the residual stream adds the output of {_where(node)}, not of a linear; {SUPPORTED}")
    check_not_quantized(node, NAME)
    return node


def trace_stream(graph: Graph) -> _Stream:
    """The residual stream of ``graph`` and the ops to rewrite, or a ConfigError."""
    roots = [n for n in graph.nodes() if n.target == aten.embedding.default]
    if not roots:
        raise ConfigError(f"{NAME}: no token embedding (aten.embedding) starts a residual stream; {SUPPORTED}")
    found, stream, queue = _Stream(roots), set(roots), list(roots)
    while queue:
        s = queue.pop()
        norm_ops: set[fx.Node] = set()
        for u in s.users:
            chain = _rms_chain(s, u) if u.target == aten.pow.Tensor_Scalar else None
            if chain:
                norm_ops.update((u, chain[0]))
                found.norms.append(_norm_weight(chain[0]))
        for u in s.users:
            if u in norm_ops or u in stream:
                continue
            if u.target == aten.rms_norm.default:
                found.norms.append(_Norm(u, u.args[2] if len(u.args) > 2 else None))
                continue
            if u.op == "output":
                raise ConfigError(f"{NAME}: the residual stream is a model output (hidden states); {SUPPORTED}")
            if u.target == aten.layer_norm.default:
                raise ConfigError(f"{NAME}: the residual stream is read by {_where(u)}; LayerNorm's mean "
                                  f"subtraction and bias do not commute with a rotation; {SUPPORTED}")
            if u.target == aten.add.Tensor and all(isinstance(a, fx.Node) for a in u.args[:2]):
                other = u.args[1] if u.args[0] is s else u.args[0]
                if other not in stream:
                    found.writers.append(_writer(other))
            elif not _is_cast(u) and not (u.target == aten.mul.Tensor and not isinstance(u.args[1], fx.Node)):
                raise ConfigError(f"{NAME}: the residual stream is read by {_where(u)}; {SUPPORTED}")
            stream.add(u)
            queue.append(u)
    for norm in found.norms:
        _readers(norm)
    return found


def _rotated(graph: Graph, stream: _Stream, q: torch.Tensor) -> list[tuple[fx.Node, int, torch.Tensor]]:
    """Every (op, argument index, new tensor), computed in float64 from the unedited graph."""

    def get(node, i):
        return graph.tensor(node.args[i].target).detach().double()

    edits = [(e, 0, get(e, 0) @ q) for e in stream.roots]
    for w in stream.writers:
        edits.append((w, 1, q.T @ get(w, 1)))
        if len(w.args) > 2 and isinstance(w.args[2], fx.Node):
            edits.append((w, 2, get(w, 2) @ q))
    for norm in stream.norms:
        g = 1 if norm.weight is None else graph.tensor(norm.weight.target).detach().double()
        edits += [(r, 1, (get(r, 1) * g) @ q) for r in norm.readers]
    return edits


def _put(graph: Graph, node: fx.Node, i: int, value: torch.Tensor, users) -> str | None:
    """``node``'s argument ``i`` reads ``value`` from a new get_attr; a tensor other ops read
    too is left to them and ``node`` gets its own (returned: the untied target)."""
    attr = node.args[i]
    value = value.to(graph.tensor(attr.target).dtype)
    untied = None
    if users[attr.target] == [node]:
        set_attr(graph.gm, attr.target, value)
        with graph.gm.graph.inserting_before(attr):
            new = graph.gm.graph.get_attr(attr.target)
    else:
        new = graph.add_tensor(f"{module_path(node) or node.name}.weight", value)
        users[attr.target].remove(node)
        untied = new.target
    node.replace_input_with(attr, new)
    return untied


def _drop_norm_weight(graph: Graph, norm: _Norm) -> None:
    if norm.weight is None:
        return
    if norm.out.target == aten.rms_norm.default:
        norm.out.update_arg(2, None)
    else:
        normed = next(a for a in norm.out.args if a is not norm.weight)
        norm.out.replace_all_uses_with(normed)
        graph.gm.graph.erase_node(norm.out)


def rotatable(graph: Graph) -> bool:
    """Whether ``trace_stream`` finds a residual stream to rotate (an RMSNorm decoder)."""
    try:
        trace_stream(graph)
    except ConfigError:
        return False
    return True


@register_pass(NAME, RotateConfig, reference="https://arxiv.org/abs/2404.00456",
               applies=Applies("decoders whose residual stream only RMSNorms read (Llama, Qwen2, ...)",
                               check=rotatable),
               report_fields={"dim": "rotated dim", "norms_folded": "norms folded"})
def rotate(graph: Graph, cfg: RotateConfig, ctx: PassContext) -> PassResult:
    stream = trace_stream(graph)
    dim = graph.tensor(stream.roots[0].args[0].target).shape[1]
    q, kind = rotation(dim, ctx.generator(), cfg.random_signs)
    edits = _rotated(graph, stream, q)
    users = attr_users(graph.gm)
    untied = [t for node, i, value in edits if (t := _put(graph, node, i, value, users))]
    for norm in stream.norms:
        _drop_norm_weight(graph, norm)
    graph.gm.recompile()
    return PassResult(graph, True, {
        "dim": dim, "rotation": kind, "embeddings": len(stream.roots), "writers": len(stream.writers),
        "norms_folded": len(stream.norms), "readers": sum(len(n.readers) for n in stream.norms), "untied": untied})
