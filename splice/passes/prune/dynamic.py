"""``prune.dynamic``: contextual (input-dependent) sparsity of MLP channels — a small predictor per
MLP scores its channels from the block's input, and only the ``1 − sparsity`` best-scored channels
of each token pass to the down projection (DejaVu, https://arxiv.org/abs/2310.17157).

For each MLP coupling group (the layers writing the channels read one input ``x``; one layer reads
them, ``act``) the calibration data gives rows of ``x`` and of ``act``; the predictor is the rank-
``rank`` least-squares map from ``x`` to ``|act|`` (ridge regression, then truncated by SVD of its
fitted values: a linear low-rank predictor where DejaVu trains a small MLP), stored as two matrices
beside the layers. The mask is applied by ``splice::predicted_topk`` before the down projection,
which exports to ONNX with the predictor (MatMul, TopK, ScatterElements). The report gives each
predictor's recall of the truly largest channels on the calibration rows. A runtime that computes
only the selected channels saves their compute; ONNX Runtime's dense kernels compute all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.coupling import analyze
from splice.ir.graph import Graph, attr_users
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import input_stats
from splice.passes.prune._common import HIDDEN_LINEAR

aten = torch.ops.aten
TOPK = torch.ops.splice.predicted_topk.default


@dataclass(frozen=True, kw_only=True)
class DynamicConfig(PassConfig):
    """Input-dependent MLP channel masks from a low-rank predictor (needs calibration)."""

    sparsity: float = field(default=0.5, metadata={"help": "share of each token's MLP channels masked, in [0, 1)"})
    rank: int = field(default=32, metadata={"help": "rank of each predictor"})
    ridge: float = field(default=1e-3, metadata={"help": "ridge term, a fraction of the inputs' mean square"})

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")


def mlp_sites(graph: Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(a layer writing the MLP channels, the layer reading them)`` per shrinkable-or-not MLP group
    whose writers share one input and whose channels one linear reads whole."""
    sites, users = [], attr_users(graph.gm)

    def linear_readers(target: str) -> list[fx.Node]:
        return [n for n in users[target] if n.target == aten.linear.default and n.args[1].target == target]

    for group in analyze(graph).groups:
        if group.kind != "mlp" or group.unit != 1:
            continue
        writers = [n for m in group.members if m.axis == 0 for n in linear_readers(m.target)]
        readers = [n for m in group.members if m.axis == 1 for n in linear_readers(m.target)]
        if writers and len(readers) == 1 and len({w.args[0] for w in writers}) == 1 \
                and graph.tensor(readers[0].args[1].target).shape[1] == group.units:
            sites.append((writers[0], readers[0]))
    return sites


def fit_predictor(x: torch.Tensor, act: torch.Tensor, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down [r, d], up [m, r])`` with ``x @ downᵀ @ upᵀ`` the rank-``r`` ridge fit of ``|act|``."""
    x, y = x.double(), act.abs().double()
    lam = ridge * float(x.square().mean()) * x.shape[0]
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)  # [d, m]
    _, _, vh = torch.linalg.svd(x @ w, full_matrices=False)
    basis = vh[:rank]  # [r, m]: the fitted scores' top directions
    return (basis @ w.T).float(), basis.T.float()


def recall(x: torch.Tensor, act: torch.Tensor, down: torch.Tensor, up: torch.Tensor, k: int) -> float:
    """Share of each row's ``k`` largest ``|act|`` channels that the predictor's top ``k`` holds."""
    pred = ((x @ down.T) @ up.T).topk(k, dim=-1).indices
    true = act.abs().topk(k, dim=-1).indices
    hits = (pred.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).float()
    return float(hits.mean())


@register_pass("prune.dynamic", DynamicConfig, reference="https://arxiv.org/abs/2310.17157", needs_calibration=True,
               report_fields={"layers": "MLPs masked", "k": "channels kept per token", "recall": "mean predictor recall"},
               applies=HIDDEN_LINEAR)
def dynamic(graph: Graph, cfg: DynamicConfig, ctx: PassContext) -> PassResult:
    sites = mlp_sites(graph)
    if not sites:
        raise ConfigError("prune.dynamic: no MLP whose channels one linear reads (gate/up -> down)")
    stats = input_stats(graph, [n for site in sites for n in site], ctx.calibration, ("inputs",))
    recalls, ks = {}, []
    for writer, reader in sites:
        x, act = torch.cat(stats[writer.name].samples), torch.cat(stats[reader.name].samples)
        if x.shape[0] != act.shape[0]:
            raise ConfigError(f"prune.dynamic: calibration rows of '{writer.args[1].target}' and "
                              f"'{reader.args[1].target}' differ")
        m = act.shape[1]
        k = max(1, m - int(cfg.sparsity * m))
        down, up = fit_predictor(x, act, min(cfg.rank, x.shape[1], m), cfg.ridge)
        base = reader.args[1].target.rsplit(".", 1)[0]
        recalls[base] = round(recall(x, act, down, up, k), 4)
        ks.append(k)
        d_node, u_node = graph.add_tensor(f"{base}.predictor_down", down), graph.add_tensor(f"{base}.predictor_up", up)
        with graph.gm.graph.inserting_before(reader):
            masked = graph.gm.graph.call_function(TOPK, (reader.args[0], writer.args[0], d_node, u_node, k))
        reader.update_arg(0, masked)
    return PassResult(graph, True, {"layers": len(sites), "k": ks[0] if len(set(ks)) == 1 else ks,
                                    "recall": round(sum(recalls.values()) / len(recalls), 4),
                                    "recall_by_layer": recalls})
