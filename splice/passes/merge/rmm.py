"""``merge.rmm``: Reversible Model Merging — instead of collapsing the models into one set of
weights, keep for every tensor a basis of ``k`` task-vector directions and each model's ``k``
coefficients, the closed-form best rank-``k`` fit of the stacked task vectors (their truncated
SVD, Eckart–Young), so every source model is reconstructed as ``θ₀ + Σⱼ cᵢⱼ bⱼ`` — exactly when
``k`` ≥ the number of models (Alipour and Amiri, https://arxiv.org/abs/2510.14163; the paper
fits each layer's low-rank factors, here each tensor's task vectors). The merged graph holds the
bases as ``splice::basis_weight`` ops and one task index (parameter ``task``, the model it
reconstructs first); ``merge.rmm_select:task=i`` switches to model ``i`` (``fold=true``: back to
plain weights, for passes that read float weights). Storage: ``k`` tensors plus ``models × k``
numbers per tensor, instead of one tensor per model. mergekit has no such method."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph, set_attr
from splice.ir.lowrank import fit_basis
from splice.kernels.merge.ops import basis_weight
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.merge._common import Group, MergeMethod, Param, register_merge

TASK = "rmm_task"
BASIS = torch.ops.splice.basis_weight.default  # registered by importing basis_weight
REFERENCE = "https://arxiv.org/abs/2510.14163"


@dataclass
class Basis:
    basis: torch.Tensor  # [k, *shape]
    coefficients: torch.Tensor  # [models, k]
    task: int


def rmm(group: Group) -> Basis:
    base, p = group.base, group.params
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    if not 0 <= p["task"] < len(group.tensors):
        raise group.error(f"task must index one of the {len(group.tensors)} merged models, got {p['task']}")
    deltas = torch.stack([(t - base).reshape(-1).to(work) for t in group.tensors])
    coefficients, basis = fit_basis(deltas, p["k"])
    return Basis(basis.reshape(-1, *base.shape).to(base.dtype), coefficients.to(base.dtype), p["task"])


def _task_node(graph: Graph, task: int) -> fx.Node:
    """The graph's task index (created at the first tensor)."""
    found = next((n for n in graph.gm.graph.nodes if n.op == "get_attr" and n.target == TASK), None)
    return found if found is not None else graph.add_tensor(TASK, torch.tensor(task, dtype=torch.int64))


def install(graph: Graph, target: str, result: Basis) -> None:
    """Every reader of ``target`` reads ``basis_weight(target, basis, coefficients, task)`` instead."""
    readers = [n for n in graph.gm.graph.nodes if n.op == "get_attr" and n.target == target]
    task = _task_node(graph, result.task)
    basis = graph.add_tensor(f"{target}_rmm_basis", result.basis)
    coefficients = graph.add_tensor(f"{target}_rmm_coefficients", result.coefficients)
    for node in readers:
        with graph.gm.graph.inserting_after(node):
            call = graph.gm.graph.call_function(BASIS, (node, basis, coefficients, task))
        node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)


register_merge(MergeMethod("rmm", REFERENCE, rmm, (
    Param("k", int, 2, check=lambda x: x >= 1, valid="[1, ∞)", help="basis size per tensor (≥ models: exact)"),
    Param("task", int, 0, help="the merged model the graph reconstructs (index among the non-base models)")),
    base="required", min_models=1, install=install,
    summary="Reversible merging: a rank-k basis per tensor from which each model is reconstructed"))


@dataclass(frozen=True, kw_only=True)
class RMMSelectConfig(PassConfig):
    """Switch a reversible merge (``merge.rmm``) to another of its models."""

    task: int = field(default=0, metadata={"help": "the model to reconstruct (index among the merged models)"})
    fold: bool = field(default=False, metadata={"help": "store it as plain weights (the basis is dropped)"})


@register_pass("merge.rmm_select", RMMSelectConfig, reference=REFERENCE, requires=("merge.rmm",))
def rmm_select(graph: Graph, cfg: RMMSelectConfig, ctx: PassContext) -> PassResult:
    calls = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target == BASIS]
    if not calls:
        raise ConfigError("merge.rmm_select: the graph holds no reversible merge (run merge.rmm first)")
    models = graph.tensor(calls[0].args[2].target).shape[0]
    if not 0 <= cfg.task < models:
        raise ConfigError(f"merge.rmm_select: task must be in [0, {models - 1}], got {cfg.task}")
    set_attr(graph.gm, TASK, torch.tensor(cfg.task, dtype=torch.int64))
    if cfg.fold:
        for call in calls:
            base = call.args[0]
            value = basis_weight(*(graph.tensor(a.target) for a in call.args))
            set_attr(graph.gm, base.target, value)
            call.replace_all_uses_with(base)
        graph.finalize()
    return PassResult(graph, True, {"task": cfg.task, "models": models, "folded": cfg.fold})
