"""``lowrank.dsformer``: DSFormer's dense × semi-structured-sparse factorization
(https://arxiv.org/abs/2312.13211) — each selected linear's weight ``W [out, in] ≈ D S`` with a small
dense ``D [out, k]`` and ``S [k, in]`` holding ``nonzeros`` entries per column, so every input column
of ``W`` is a sparse combination of ``k`` shared dense atoms. Stored as ``D``, the kept values of ``S``
``[s, in]`` and their row indices (uint8 when ``k <= 256``), read by ``splice::dense_sparse_linear``.

Fitted without data by alternating minimisation of ``‖W − D S‖``: ``D`` starts from the top-``k``
singular directions; each round picks every column's ``s`` largest least-squares coefficients on
``D``, refits them exactly on that pattern, and solves ``D`` for the new ``S``. (The paper refines the
factors by training through its straight-through factorizer; here ``splice train`` can fine-tune ``D``
and the values, which are trainable.) The report gives each layer's relative weight error and the
bytes stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.select import module_path
from splice.kernels.lowrank.factors import refit_values, scatter_rows
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass
from splice.passes.lowrank._common import LOWRANK_REPORT, check_rank, linears, nbytes, replace_linear, store
from splice.ir.select import validate_targets

WHO = "lowrank.dsformer"
DENSE_SPARSE = torch.ops.splice.dense_sparse_linear.default


@dataclass(frozen=True, kw_only=True)
class DSFormerConfig(PassConfig):
    """Each linear as dense D [out, k] times a sparse S [k, in] with a fixed number of non-zeros per column."""

    rank: int = field(default=0, metadata={"help": "inner dimension k (atoms); 0: a quarter of min(in, out)"})
    nonzeros: int = field(default=4, metadata={"help": "non-zeros s per column of S, at most k"})
    iterations: int = field(default=8, metadata={"help": "alternating-minimisation rounds"})
    targets: str = field(default="linear|!lm_head", metadata={"help": "layers: kinds, path globs, re:, !exclude, joined by |"})

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"rank must be >= 1 (or 0 for a quarter of min(in, out)), got {self.rank}")
        if self.nonzeros < 1:
            raise ValueError(f"nonzeros must be >= 1, got {self.nonzeros}")
        if self.rank and self.nonzeros > self.rank:
            raise ValueError(f"nonzeros must be at most rank ({self.rank}), got {self.nonzeros}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        validate_targets(self.targets)


def dense_sparse(w: torch.Tensor, k: int, s: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``D [out, k]``, ``values [s, in]``, ``index [s, in]`` with ``D · scatter_rows(values, index, k) ≈ w``."""
    w = w.float()
    u, sv, _ = torch.linalg.svd(w, full_matrices=False)
    d = u[:, :k] * sv[:k]
    for step in range(iterations + 1):
        coef = torch.linalg.lstsq(d, w).solution  # [k, in]: every column on every atom
        index = coef.abs().topk(s, dim=0).indices
        values = refit_values(d, index, w)
        if step == iterations:
            break
        d = torch.linalg.lstsq(scatter_rows(values, index, k).T, w.T, driver="gelsy").solution.T  # unused atoms: 0
    return d, values, index


@register_pass(WHO, DSFormerConfig, reference="https://arxiv.org/abs/2312.13211", report_fields=LOWRANK_REPORT,
               applies=Applies("a linear layer", kinds=("linear",)))
def dsformer(graph: Graph, cfg: DSFormerConfig, ctx: PassContext) -> PassResult:
    errors, before, after = {}, 0, 0
    for node in linears(graph, cfg.targets, WHO):
        w = graph.tensor(node.args[1].target).detach()
        check_rank(WHO, cfg.rank, node, tuple(w.shape))
        k = cfg.rank or max(min(w.shape) // 4, cfg.nonzeros)
        d, values, index = dense_sparse(w, k, min(cfg.nonzeros, k), cfg.iterations)
        approx = d @ scatter_rows(values, index, k)
        errors[module_path(node) or node.name] = round(float((w.float() - approx).norm() / w.float().norm().clamp_min(1e-30)), 6)
        index = index.to(torch.uint8 if k <= 256 else torch.int16 if k <= 32767 else torch.int32)
        stored = [store(graph, node, "D", d, w, trainable=True), store(graph, node, "values", values, w, trainable=True),
                  store(graph, node, "index", index, index)]
        before += nbytes(w)
        after += sum(nbytes(graph.tensor(n.target)) for n in stored)
        replace_linear(graph, node, DENSE_SPARSE, stored)
    return PassResult(graph, True, {"layers": len(errors), "weight_bytes_before": before, "weight_bytes_after": after,
                                    "rel_error": errors})
