"""``delta.extract``: a fine-tuned model as its base model plus a weight delta, carried in the graph.

The pass runs on the fine-tuned graph; the base comes as ``ctx.graphs["base"]`` (``graphs={"base": g}``
or the option ``base=PATH``: an HF directory, artifact or ``.pt2``). Tensors are paired by graph
structure (``ir/match.py``; another architecture is refused naming the first mismatch). Every base
tensor is stored as ``delta_base.<name>``; a float tensor that differs becomes
``splice::delta_dense(base, W_ft − W_base, 1)`` (the delta in float32, so ``base + delta`` is the
fine-tuned weight), one equal in both reads the base's. The graph still computes the fine-tuned model
and exports to ONNX; the other ``delta.*`` passes compress the deltas, ``delta.apply`` folds them, and
``Graph.save(path, delta_only=True)`` writes the delta without the base (``ir/deltas.py``). The base's
``weights_digest`` goes into the report and ``graph.source["delta_base"]``, so a wrong base is refused.
Task vectors: https://arxiv.org/abs/2212.04089.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from splice.ir.deltas import BASE
from splice.ir.graph import Graph
from splice.ir.match import match_parameters
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.delta._common import DENSE, put, record_base, refuse_deltas

WHO = "delta.extract"


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(PassConfig):
    """The fine-tuned model as base + weight delta (the base: option base or graphs['base'])."""

    base: str = field(default="", metadata={"help": "the base model: HF dir, artifact dir or .pt2 (or graphs['base'])"})


def _bind(graph: Graph, base: Graph, pairs: dict[str, str]) -> tuple[int, int, float]:
    """Replace every stored tensor of ``graph`` by the base's or a dense delta op (module docstring);
    returns (deltas, tensors equal, squared norm of the deltas)."""
    base_nodes, deltas, equal, norm2 = {}, 0, 0, 0.0
    for node in [n for n in graph.gm.graph.nodes if n.op == "get_attr"]:
        name = pairs[node.target]
        w, wb = graph.tensor(node.target).detach(), base.tensor(name).detach()
        if name not in base_nodes:
            base_nodes[name] = put(graph, BASE + name, wb)
        if torch.equal(w, wb):
            node.replace_all_uses_with(base_nodes[name])
            equal += 1
        elif w.is_floating_point():
            delta = w.float() - wb.float()
            norm2 += float(delta.norm()) ** 2
            args = (base_nodes[name], put(graph, f"delta.{name}.0", delta), put(graph, f"delta.{name}.1", torch.ones(())))
            with graph.gm.graph.inserting_before(node):
                node.replace_all_uses_with(graph.gm.graph.call_function(DENSE, args))
            deltas += 1
    return deltas, equal, norm2


@register_pass(WHO, ExtractConfig, reference="https://arxiv.org/abs/2212.04089", graphs=("base",), provides=("delta",),
               report_fields={"tensors": "tensors with a delta", "tensors_equal": "tensors equal to the base's",
                              "base_weights_sha256": "the base's weights digest"})
def extract(graph: Graph, cfg: ExtractConfig, ctx: PassContext) -> PassResult:
    refuse_deltas(graph, WHO)
    base = ctx.graphs["base"]
    where = cfg.base or "graphs['base']"
    pairs = match_parameters(base, graph, (f"base '{where}'", "the fine-tuned model"), WHO)
    digest = record_base(graph, base, str(Path(cfg.base).resolve()) if cfg.base else None)
    deltas, equal, norm2 = _bind(graph, base, pairs)
    return PassResult(graph, True, {"tensors": deltas, "tensors_equal": equal, "delta_norm": round(norm2 ** 0.5, 6),
                                    "base_weights_sha256": digest})
