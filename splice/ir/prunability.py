"""How prunable each layer looks, from its weights alone: ``splice inspect MODEL --prunability``.

Two numbers per weight layer (linear, conv; embeddings and the output head are listed too):

* **load** — the layer's density, the share of its weights kept (1.0 before pruning). It is the
  load-like parameter of the three-regime model of pruning (Zhou et al., ICML 2023,
  https://arxiv.org/abs/2305.18383): the same dense model sits in different regimes of the pruned
  loss landscape depending on how much load (density) the pruned model keeps.
* **alpha** — the heavy-tailed self-regularization exponent of the layer's empirical spectral
  density: the eigenvalues ``λ`` of ``WᵀW`` (squared singular values), fitted to a power law
  ``p(λ) ∝ λ^-α`` over their upper half by the Hill estimator, ``α = 1 + k / Σ ln(λ_i / λ_k)``
  (WeightWatcher's ``PL_Alpha_Hill`` with ``k = n/2``). A smaller alpha is a heavier tail: a layer
  trained to hold more structure, which tolerates less pruning; AlphaPruning
  (https://arxiv.org/abs/2410.10912) gives such layers lower sparsity.

The three-regime model's other axis (a temperature-like training parameter, with loss-landscape
connectivity and output similarity between two trained models) needs models this report does not
have; it states what one graph shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splice.ir.graph import Graph
from splice.ir.select import op_kind
from splice.ir.sparsity import weight_layers
from splice.ir.weights import dense_weight


@dataclass(frozen=True)
class LayerPrunability:
    key: str  # module path (the mask key)
    kind: str  # linear / conv / embedding
    shape: tuple[int, ...]
    load: float  # kept fraction
    alpha: float | None  # None: too few eigenvalues to fit


def hill_alpha(w: torch.Tensor) -> float | None:
    """The Hill estimate of the power-law exponent of ``w``'s ESD over its upper half (None under 4 eigenvalues)."""
    mat = w.detach().double().reshape(w.shape[0], -1)
    eig = torch.linalg.svdvals(mat).square().sort(descending=True).values
    eig = eig[eig > eig[0] * 1e-12] if len(eig) else eig
    k = len(eig) // 2
    if k < 2:
        return None
    logs = torch.log(eig[:k] / eig[k - 1])
    total = float(logs.sum())
    return 1 + k / total if total > 0 else None


def prunability(graph: Graph) -> list[LayerPrunability]:
    """One row per weight layer (a tied weight once), in graph order."""
    rows, seen = [], set()
    for key, node in weight_layers(graph).items():
        w = dense_weight(graph, node)
        if w.dim() < 2 or id(w) in seen:
            continue
        seen.add(id(w))
        keep = graph.masks.get(key)
        load = float(keep.float().mean()) if keep is not None else float((w != 0).float().mean())
        rows.append(LayerPrunability(key, op_kind(node) or "?", tuple(w.shape), load, hill_alpha(w)))
    return rows


def summary(rows: list[LayerPrunability]) -> dict:
    """Overall load (kept share of all weights) and the parameter-weighted mean alpha."""
    sizes = [torch.Size(r.shape).numel() for r in rows]
    total = sum(sizes) or 1
    fitted = [(r.alpha, n) for r, n in zip(rows, sizes) if r.alpha is not None]
    return {"layers": len(rows), "load": sum(r.load * n for r, n in zip(rows, sizes)) / total,
            "alpha": sum(a * n for a, n in fitted) / max(sum(n for _, n in fitted), 1) if fitted else None}
