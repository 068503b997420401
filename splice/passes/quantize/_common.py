"""Shared by every weight quantizer: the config fields, layer selection, and the rewrite
``linear -> splice::qlinear`` / ``embedding -> splice::qembedding`` over packed storage.

A quantizer only decides the integer codes and the grid of each weight; this module checks
the group size, keeps pruned weights (``ir/sparsity.py``) on the grid's zero, stores the packed
tensors, and rewrites the nodes. Tied weights (one tensor
read by an embedding and the LM head) are quantized once and shared by both ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.metrics import sqnr_db
from splice.ir.select import module_path, select_nodes, validate_targets
from splice.ir.sparsity import mask_of
from splice.kernels.quant.grid import GroupGrid
from splice.passes.base import PassConfig

aten = torch.ops.aten
QUANTIZED_OPS = (torch.ops.splice.qlinear.default, torch.ops.splice.qembedding.default,
                 torch.ops.splice.fake_quant_linear.default, torch.ops.splice.lut_linear.default,
                 torch.ops.splice.w8a8_linear.default, torch.ops.splice.bcq_linear.default)


@dataclass(frozen=True, kw_only=True)
class WeightQuantConfig(PassConfig):
    """Fields every group-wise weight quantizer takes."""

    bits: int = field(default=4, metadata={"help": "bits per weight, 2..8"})
    group_size: int = field(default=32, metadata={"help": "weights per scale along the input dim; 0 or -1 = per channel"})
    symmetric: bool = field(default=True, metadata={"help": "zero point fixed at 2**(bits-1) (no stored zeros)"})
    targets: str = field(default="linear", metadata={"help": "layers: kinds linear/embedding, path globs, re:, !exclude, joined by |"})

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be 2..8, got {self.bits}")
        if self.group_size < -1:
            raise ValueError(f"group_size must be positive, or 0/-1 for per-channel, got {self.group_size}")
        validate_targets(self.targets)


def resolve_group(cfg: WeightQuantConfig, k: int, path: str, pass_name: str) -> int:
    g = k if cfg.group_size <= 0 else cfg.group_size
    if k % g:
        divisors = [d for d in (16, 32, 64, 128, 256) if k % d == 0]
        hint = f"; divisors that work: {', '.join(map(str, divisors))}" if divisors else "; use group_size=0 (per-channel)"
        raise ConfigError(f"{pass_name}: group_size {g} does not divide in_features {k} of '{path}'{hint}")
    return g


def layer_grid(cfg: WeightQuantConfig, node: fx.Node, k: int, pass_name: str) -> GroupGrid:
    """The group grid ``cfg`` puts on the weight of layer ``node`` (``k`` input features)."""
    return GroupGrid(cfg.bits, resolve_group(cfg, k, module_path(node), pass_name), cfg.symmetric)


def pinning(**old_defaults):
    """A ``migrate`` hook for a pass whose version 2 added options (with new defaults) to its
    version 1: a version-1 entry gets the options' values that reproduce what it ran."""

    def migrate(entry: dict) -> dict:
        if entry.get("version") == 1:
            entry["config"] = {**old_defaults, **(entry.get("config") or {})}
            entry["version"] = 2
        return entry

    return migrate


def output_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row of ``delta`` [N, K] (a weight error): ``δ H δᵀ``, the mean squared output error
    over the inputs whose Hessian is ``H``."""
    return (delta @ h).mul_(delta).sum(-1)


def check_not_quantized(node: fx.Node, pass_name: str) -> None:
    if node.target in QUANTIZED_OPS:
        raise ConfigError(f"{pass_name}: '{module_path(node)}' is already quantized "
                          f"(by {node.meta.get('splice_pass', 'an earlier pass')}); quantize the float model")


# (node, float weight [N, K], grid) -> integer codes [N, K], scales [N, G], zeros [N, G]
QuantizeFn = Callable[[fx.Node, torch.Tensor, GroupGrid], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


# the report fields of quantize_layers' report (``report_fields=`` of the passes that use it)
QUANT_REPORT = {"layers": "layers quantized", "weight_bytes_before": "weight bytes before",
                "weight_bytes_after": "weight bytes after"}


def quantize_layers(graph: Graph, cfg: WeightQuantConfig, pass_name: str, quantize: QuantizeFn,
                    bits_of: Callable[[str], int] | None = None, nodes: list[fx.Node] | None = None) -> dict:
    """Rewrite every selected linear/embedding of ``graph`` (in place: the pass's own copy), or
    ``nodes``, to its quantized op; returns the report. ``bits_of(weight target)`` overrides
    ``cfg.bits`` per weight (mixed precision, ``quantize.allocate``)."""
    if nodes is None:
        nodes = select_nodes(graph.gm, cfg.targets, ("linear", "embedding"), pass_name)
    stored: dict[str, tuple[fx.Node, fx.Node, fx.Node | None, int]] = {}
    layers, before, after = {}, 0, 0
    for node in nodes:
        check_not_quantized(node, pass_name)
        w_node = node.args[0] if node.target == aten.embedding.default else node.args[1]
        if getattr(w_node, "op", None) != "get_attr":
            computed = getattr(getattr(w_node, "target", None), "name", lambda: "an op")()
            raise ConfigError(f"{pass_name}: '{module_path(node) or node.name}' computes its weight with {computed}; "
                              "store plain weights first (delta.apply, merge.rmm_select:fold=true, prune.bip_finish)")
        w = graph.tensor(w_node.target)
        if w_node.target not in stored:
            g = resolve_group(cfg, w.shape[1], module_path(node), pass_name)
            grid = GroupGrid(cfg.bits if bits_of is None else bits_of(w_node.target), g, cfg.symmetric)
            codes, scale, zero = quantize(node, w.detach().float(), grid)
            if (keep := mask_of(graph, node)) is not None:  # pruned weights stay on the grid's zero
                codes = torch.where(keep, codes, zero.repeat_interleave(grid.group_size, dim=1).to(codes.dtype))
            deq = grid.dequantize(codes, scale, zero)
            layers[module_path(node)] = round(sqnr_db(w.detach().float(), deq), 2)
            stored[w_node.target] = _store(graph, w_node.target, grid, codes, scale.to(w.dtype), zero)
            before += w.numel() * w.element_size()
            after += sum(graph.tensor(n.target).numel() * graph.tensor(n.target).element_size()
                         for n in stored[w_node.target][:3] if n is not None)
        _replace(graph, node, *stored[w_node.target])
    return {"layers": len(nodes), "weight_bytes_before": before, "weight_bytes_after": after,
            "weight_sqnr_db": layers}


def stored_solution(graph: Graph, target: str, grid: GroupGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zero points that ``quantize_layers`` stored for float weight ``target``."""
    base = target.removesuffix(".weight")
    qweight = graph.tensor(base + ".qweight")
    zeros = None if grid.symmetric else graph.tensor(base + ".qzeros")
    return (grid.unpack_codes(qweight), graph.tensor(base + ".scales").detach().float(),
            grid.unpack_zeros(zeros, qweight.shape[1], qweight))


def _store(graph: Graph, target: str, grid: GroupGrid, codes, scale, zero):
    base = target.removesuffix(".weight")
    q = graph.add_tensor(base + ".qweight", grid.pack_codes(codes))
    s = graph.add_tensor(base + ".scales", scale.contiguous())
    packed_zero = grid.pack_zeros(zero)
    z = None if packed_zero is None else graph.add_tensor(base + ".qzeros", packed_zero)
    return q, s, z, grid.bits, grid.group_size


def _replace(graph: Graph, node: fx.Node, q, s, z, bits: int, group_size: int) -> None:
    if node.target == aten.embedding.default:
        replace_node(graph, node, torch.ops.splice.qembedding.default, (node.args[1], q, s, z, bits, group_size))
    else:
        bias = node.args[2] if len(node.args) > 2 else None
        replace_node(graph, node, torch.ops.splice.qlinear.default, (node.args[0], q, s, z, bias, bits, group_size))


def replace_node(graph: Graph, node: fx.Node, op, args: tuple) -> fx.Node:
    """Put ``op(*args)`` in ``node``'s place (keeping its module path) and erase ``node``."""
    fxg = graph.gm.graph
    with fxg.inserting_before(node):
        new = fxg.call_function(op, args)
    new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.replace_all_uses_with(new)
    fxg.erase_node(node)
    return new
