"""The injection loop shared by adapter passes that build per-layer tensors (NOLA, SVFit, SORSA,
FLoRA, TeRA, VeRA …), and the helpers they share.

``inject`` selects the target layers, refuses a name already taken on a layer, builds each layer's
tensors with the method's ``make(layer)`` (once per module: a module called twice shares them, as
PEFT does), adds the 0-d ``scale`` tensor from ``meta["scaling"]``, attaches the delta op and
reports the trainable count. ``FrozenRandom`` gives frozen random tensors generated from
``(seed, key, shape)`` and stored once per shape, shared by every layer of that shape (NOLA's
bases, TeRA's core and factors), so stored bytes count each random tensor once. Also: option
range checks for configs, the rank check, top-r SVD and the SVD-form dense update, random
orthonormal and uniform draws.
"""
from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from splice.ir.graph import Graph
from splice.ir.select import select_nodes
from splice.passes.adapters._base import BaseOp, base_op
from splice.passes.adapters._common import (
    AdapterConfig,
    Method,
    attach,
    free_layer_path,
    layer_path,
    taken_names,
)
from splice.passes.base import PassResult


@dataclass(frozen=True)
class Layer:
    node: fx.Node
    path: str
    handler: BaseOp
    out_f: int
    in_f: int  # fan-in (a conv's in/groups · kh · kw)
    calls: int  # how many times the module is called in the graph


def check_options(cfg, *, at_least_one: tuple[str, ...] = (), positive: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = ()) -> None:
    """For a config's ``__post_init__``: ValueError naming the first option out of its range."""
    for names, ok, rule in ((at_least_one, lambda v: v >= 1, ">= 1"), (positive, lambda v: v > 0, "> 0"),
                            (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise ValueError(f"{name} must be {rule}, got {getattr(cfg, name)}")


Tensors = dict[str, torch.Tensor | fx.Node]


def inject(graph: Graph, cfg: AdapterConfig, who: str, method: Method, kinds: tuple[str, ...],
           make: Callable[[Layer], Tensors], meta: dict[str, Any], nodes: list[fx.Node] | None = None) -> PassResult:
    """``nodes``: the layers, when the pass chose them itself (IA3 splits its targets); default ``cfg.targets``."""
    nodes = select_nodes(graph.gm, cfg.targets, kinds, who) if nodes is None else nodes
    taken = taken_names(graph)
    calls = Counter(layer_path(n) for n in nodes)
    meta = {**meta, "weight": 1.0, "active": True}
    made: dict[str, dict[str, fx.Node]] = {}
    params = 0
    for node in nodes:
        path = free_layer_path(who, node, cfg.name, taken)
        handler = base_op(node, who)
        out_f, in_f = handler.shape(graph, node, who)
        if path not in made:
            tensors = make(Layer(node, path, handler, out_f, in_f, calls[path]))
            tensors["scale"] = torch.tensor(float(meta["scaling"]), dtype=torch.float32)
            params += sum(t.numel() for k, t in tensors.items() if k in method.trainable)
            made[path] = attach(graph, node, cfg.name, method, tensors, meta)
        else:
            attach(graph, node, cfg.name, method, made[path], meta)
    report = {"adapter": cfg.name, "layers": len(nodes), "trainable_params": params}
    return PassResult(graph, True, report)


class FrozenRandom:
    """Frozen random tensors of adapter ``name``, one per ``(key, shape)``, stored as
    ``adapters.<name>.<key>_<shape>`` and read by every layer that asks for that shape."""

    def __init__(self, graph: Graph, name: str, seed: int):
        self.graph, self.name, self.seed = graph, name, seed
        self.nodes: dict[tuple[str, tuple[int, ...]], fx.Node] = {}

    def generator(self, key: str, shape: tuple[int, ...]) -> torch.Generator:
        """Reproducible from ``(seed, key, shape)`` alone (NOLA's "regenerate from the seed")."""
        return torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{key}:{shape}".encode()))

    def get(self, key: str, shape: tuple[int, ...], draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor]) -> fx.Node:
        if (key, shape) not in self.nodes:
            value = draw(shape, self.generator(key, shape))
            label = "x".join(map(str, shape))
            self.nodes[key, shape] = self.graph.add_tensor(f"adapters.{self.name}.{key}_{label}", value)
        return self.nodes[key, shape]


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, cols]`` with random orthonormal columns (QR of a Gaussian), ``cols <= rows``."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q.contiguous()


def uniform(bound: float) -> Callable[[tuple[int, ...], torch.Generator], torch.Tensor]:
    return lambda shape, gen: torch.empty(shape).uniform_(-bound, bound, generator=gen)


def principal(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of a float ``[out, in]`` weight: ``U [out, r]``, ``S [r]``, ``Vh [r, in]``."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous()


def svd_delta_weight(t: dict[str, torch.Tensor], s_key: str) -> torch.Tensor:
    """``U·diag(S)·Vh · scale`` of an SVD-form adapter (SVFit's ``S`` is ``ds``)."""
    u, s, vh, scale = (t[k].detach().float() for k in ("U", s_key, "Vh", "scale"))
    return (u * s) @ vh * scale
