"""``share.dictionary``: MASA (matrix atom sharing, https://arxiv.org/abs/2508.04581) — each of the
stack's N layers' weight of one kind (``q_proj`` of every block, then ``k_proj`` …) as the kinds'
shared mean plus a combination of ``atoms`` shared matrices: ``W_l ≈ W̄ + Σ_s c[l, s] · D_s``. The
atoms and coefficients are the closed-form least-squares fit (truncated SVD of the centred, stacked
weights via their N × N Gram matrix, ``ir/lowrank.fit_basis``). Each layer reads its weight from
``splice::basis_weight(W̄, D, C, l)`` (the reversible-merge op: ``Gather`` + ``MatMul`` in ONNX), so
the mean, the atoms and the coefficient table are stored once and a layer adds a 0-d index: a
kind's N matrices become atoms + 1. ``targets`` picks the layers (default: attention projections).
Recovery: the mean, atoms and coefficients are marked trainable, so ``splice train --trainable
adapters,weights,norms`` tunes them with the rest of the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.blocks import stack, uniform_stack
from splice.ir.graph import Graph
from splice.ir.lowrank import fit_basis
from splice.ir.select import select_nodes, validate_targets
from splice.ir.weights import stored_weight
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass

WHO = "share.dictionary"
BASIS = torch.ops.splice.basis_weight.default  # registered with the op families (kernels/families.py)


@dataclass(frozen=True, kw_only=True)
class DictionaryConfig(PassConfig):
    """Each kind of layer across the stack as its mean plus a combination of shared atoms (MASA)."""

    atoms: int = field(default=0, metadata={"help": "shared atoms per kind (0: half the blocks, minus the mean)"})
    targets: str = field(default=r"re:.*(attn|attention).*", metadata={"help": "the layers shared (default: attention)"})

    def __post_init__(self):
        if self.atoms < 0:
            raise ValueError(f"atoms must be >= 0, got {self.atoms}")
        validate_targets(self.targets)


def _kinds(graph: Graph, cfg: DictionaryConfig, blocks) -> dict[str, list]:
    """Block-relative weight name -> the linear of each block that reads it, in stack order."""
    nodes = select_nodes(graph.gm, cfg.targets, ("linear",), WHO)
    kinds: dict[str, list] = {}
    for node in nodes:
        target = stored_weight(node).target
        block = next((i for i, b in enumerate(blocks) if target.startswith(b.path + ".")), None)
        if block is not None:
            kinds.setdefault(target[len(blocks[block].path) + 1:], []).append((block, node))
    return {k: [n for _, n in sorted(v, key=lambda x: x[0])] for k, v in kinds.items() if len(v) == len(blocks)}


@register_pass(WHO, DictionaryConfig, reference="https://arxiv.org/abs/2508.04581",
               applies=Applies("a stack of at least two blocks of the same shapes", kinds=("linear",), check=uniform_stack),
               report_fields={"kinds": "kinds of layer shared", "params_before": "parameters of the shared layers",
                              "params_after": "parameters stored for them"})
def dictionary(graph: Graph, cfg: DictionaryConfig, ctx: PassContext) -> PassResult:
    blocks = stack(graph, WHO)
    n = len(blocks)
    atoms = cfg.atoms or max(n // 2 - 1, 1)
    if atoms >= n:
        raise ConfigError(f"{WHO}: atoms={atoms} must be fewer than the {n} blocks (atoms + 1 matrices replace {n})")
    kinds = _kinds(graph, cfg, blocks)
    if not kinds:
        raise ConfigError(f"{WHO}: targets '{cfg.targets}' select no layer present in every block of the stack")
    before = after = 0
    errors = {}
    for kind, nodes in kinds.items():
        weights = [graph.tensor(stored_weight(node).target).detach() for node in nodes]
        stacked = torch.stack([w.reshape(-1).float() for w in weights])
        mean = stacked.mean(0)
        coefficients, basis = fit_basis(stacked - mean, atoms)
        approx = mean + coefficients @ basis
        errors[kind] = float((approx - stacked).norm() / stacked.norm())
        shape, dtype = weights[0].shape, weights[0].dtype
        mean_node = graph.add_tensor(f"shared.{kind}.mean", mean.reshape(shape).to(dtype), trainable=True)
        basis_node = graph.add_tensor(f"shared.{kind}.atoms", basis.reshape(-1, *shape).to(dtype), trainable=True)
        coeff_node = graph.add_tensor(f"shared.{kind}.coefficients", coefficients.to(dtype), trainable=True)
        for layer, node in enumerate(nodes):
            index = graph.add_tensor(f"{blocks[layer].path}.{kind}_atom_index", torch.tensor(layer, dtype=torch.int64))
            with graph.gm.graph.inserting_before(node):
                weight = graph.gm.graph.call_function(BASIS, (mean_node, basis_node, coeff_node, index))
            node.update_arg(1, weight)
        before += sum(w.numel() for w in weights)
        after += mean.numel() * (1 + basis.shape[0]) + coefficients.numel()
    graph.finalize()
    return PassResult(graph, True, {"kinds": sorted(kinds), "atoms": atoms, "params_before": before,
                                    "params_after": after, "relative_error": errors})
