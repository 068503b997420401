"""Sparse fine-tuning masks as adapters: what ``adapter.lift``/``s2ft``/``sara``/``hft``/``dsee`` share.

Only the selected entries of ``ΔW`` are stored and trainable; a fixed bool mask says where they
go, and its shape carries the layer's dims (``kernels/adapters/sparse_ops.py``)::

    sparse  splice::sparse_delta(x, values[nnz], mask[out, in], scale)   ΔW[mask] = values
    rows    splice::row_delta(x, values[k, in], mask[out], scale)        ΔW[mask, :] = values
    cols    splice::col_delta(x, values[out, k], mask[in], scale)        ΔW[:, mask] = values
    dsee    splice::dsee_delta(x, A, B, values, mask[out, in], scale)    ΔW = B A + S

The structured forms compute only the chosen rows/columns. ``values`` start at zero (outputs
unchanged) and are the only trainable tensors besides DSEE's A/B, so the honest trainable count is
the mask's size; ``scale`` is a 0-d tensor like LoRA's (weight, on/off) and the dense update for
``adapter.fold`` is rebuilt exactly from values and mask. ``attach_per_layer`` is the loop every
pass here (and ``adapter.extract``) runs over its targeted layers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.ir.graph import Graph
from splice.ir.select import select_nodes
from splice.kernels.adapters.sparse_ops import scatter_mask
from splice.passes.adapters._base import base_op
from splice.passes.adapters._common import (
    AdapterConfig,
    Method,
    attach,
    free_layer_path,
    register_method,
    taken_names,
)

Built = tuple[Method, dict[str, torch.Tensor], dict[str, Any]]  # method, tensors, layer report


def _scaled(dw: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return dw * t["scale"].detach().float()


def _values(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["values"].detach().float()


def _sparse_weight(t):
    return _scaled(scatter_mask(_values(t), t["mask"]), t)


def _row_weight(t):
    v = _values(t)
    return _scaled(scatter_mask(v.reshape(-1), t["mask"][:, None].expand(-1, v.shape[1])), t)


def _col_weight(t):
    v = _values(t)
    return _scaled(scatter_mask(v.reshape(-1), t["mask"][None, :].expand(v.shape[0], -1)), t)


def _dsee_weight(t):
    return _sparse_weight(t) + _scaled(t["B"].detach().float() @ t["A"].detach().float(), t)


_SPARSE_KEYS = ("values", "mask", "scale")
SPARSE = register_method(Method("sparse", torch.ops.splice.sparse_delta.default, _SPARSE_KEYS, ("values",), _sparse_weight))
ROWS = register_method(Method("rows", torch.ops.splice.row_delta.default, _SPARSE_KEYS, ("values",), _row_weight))
COLS = register_method(Method("cols", torch.ops.splice.col_delta.default, _SPARSE_KEYS, ("values",), _col_weight))
DSEE = register_method(Method("dsee", torch.ops.splice.dsee_delta.default, ("A", "B", "values", "mask", "scale"),
                              ("A", "B", "values"), _dsee_weight))


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True)
class DensityConfig(AdapterConfig):
    density: float = field(default=0.05, metadata={"help": "fraction of each layer's entries trained (0, 1]"})

    def __post_init__(self):
        super().__post_init__()
        check_fraction("density", self.density)


@dataclass(frozen=True, kw_only=True)
class RankDensityConfig(DensityConfig):
    rank: int = field(default=8, metadata={"help": "rank of the approximation W_r the mask comes from (DSEE: also of B A)"})

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


# ---------------------------------------------------------------------------- masks


def check_fraction(option: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{option} must be in (0, 1], got {value}")


def count(fraction: float, total: int) -> int:
    """How many of ``total`` items a fraction selects (at least one)."""
    return max(1, min(total, round(fraction * total)))


def low_rank(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``w`` (truncated SVD, Eckart–Young)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of ``score`` (same shape)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[score.reshape(-1).topk(k).indices] = True
    return mask.reshape(score.shape)


def sparse_update(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero values at ``mask`` (outputs unchanged) and a unit scale."""
    return {"values": torch.zeros(int(mask.sum())), "mask": mask, "scale": torch.ones(())}


def channel_update(mask: torch.Tensor, side: str, w: torch.Tensor) -> tuple[Method, dict[str, torch.Tensor]]:
    """Zero rows (``side="out"``, mask ``[out]``) or columns (``"in"``, mask ``[in]``) of ``ΔW``."""
    k = int(mask.sum())
    values = torch.zeros(k, w.shape[1]) if side == "out" else torch.zeros(w.shape[0], k)
    return (ROWS if side == "out" else COLS), {"values": values, "mask": mask, "scale": torch.ones(())}


# ---------------------------------------------------------------------------- the loop


def attach_per_layer(graph: Graph, cfg, who: str, build: Callable[[str, torch.Tensor], Built],
                     meta: dict[str, Any]) -> dict[str, Any]:
    """Attach adapter ``cfg.name`` beside every linear ``cfg.targets`` selects. ``build(path, W)``
    (``W`` the layer's float ``[out, in]`` weight) returns (method, tensors, the layer's report);
    ``meta`` (the options) goes on every delta node. A module called more than once shares one
    adapter (as in PEFT)."""
    meta = {"scaling": 1.0, "weight": 1.0, "active": True, **meta}
    nodes = select_nodes(graph.gm, cfg.targets, ("linear",), who)
    taken = taken_names(graph)
    made: dict[str, tuple] = {}
    params, layers = 0, {}
    for node in nodes:
        path = free_layer_path(who, node, cfg.name, taken)
        if path in made:
            attach(graph, node, cfg.name, *made[path])
            continue
        handler = base_op(node, who)
        handler.shape(graph, node, who)  # a layer without a stored weight is an error naming it
        method, tensors, layers[path] = build(path, handler.weight(graph, node))
        made[path] = (method, attach(graph, node, cfg.name, method, tensors, meta), meta)
        params += sum(tensors[k].numel() for k in method.trainable)
    return {"adapter": cfg.name, "layers": len(nodes), "trainable_params": params, "per_layer": layers}
