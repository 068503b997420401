"""Linear mode connectivity of two models of one architecture (``splice eval A --lmc B``).

``lmc`` measures the label-free loss (``ir/loss.py``) at evenly spaced points of the straight line
from A's weights to B's and the path's barrier, ``max_α loss(α) − ((1 − α)·loss(A) + α·loss(B))``
(Frankle et al., https://arxiv.org/abs/1912.05671; Ainsworth et al., https://arxiv.org/abs/2209.04836);
given ``aligned``, B with its units permuted onto A's (``merge.permute`` at ``t = 1``: the CLI runs
it, eval imports no pass), also the path from A to that. Per layer it reports how well the two
models' weights line up: the mean ``|cos|`` between A's top-k left singular vectors and B's, matched
one to one (a linear assignment on ``|cos|``, since near-equal singular values swap places). B is
paired with A by graph structure (``ir/match.py``): another architecture is refused naming the
first mismatch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.loss import Loss, alphas, loss_path
from splice.ir.match import match_parameters
from splice.ir.select import module_path
from splice.ir.sparsity import weight_layers
from splice.ir.weights import stored_weight

WHO = "eval lmc"


def paired(a: Graph, b: Graph, names: tuple[str, str]) -> dict[str, torch.Tensor]:
    """``b``'s stored tensors keyed by ``a``'s targets (paired by structure)."""
    return {ta: b.tensor(tb).detach() for tb, ta in match_parameters(a, b, names, WHO).items()}


def singular_alignment(x: torch.Tensor, y: torch.Tensor, top_k: int) -> float:
    """Mean ``|cos|`` between the top-``top_k`` left singular vectors of ``x`` and of ``y`` (2-D and
    up: the first axis against the rest), matched one to one."""
    ux = torch.linalg.svd(x.detach().float().flatten(1), full_matrices=False)[0]
    uy = torch.linalg.svd(y.detach().float().flatten(1), full_matrices=False)[0]
    k = min(top_k, ux.shape[1])
    cos = (ux[:, :k].T @ uy[:, :k]).abs().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return float(cos[rows, cols].mean())


def layer_weights(graph: Graph) -> dict[str, str]:
    """``{weight target: layer path}`` of every linear, conv and embedding weight (a tied one once)."""
    out: dict[str, str] = {}
    for node in weight_layers(graph).values():
        target = stored_weight(node).target
        if graph.tensor(target).is_floating_point() and graph.tensor(target).dim() >= 2:
            out.setdefault(target, module_path(node) or target)
    return out


def lmc(a: Graph, b: Graph, calibration: Sequence[tuple], *, points: int = 11, aligned: Graph | None = None,
        top_k: int = 8, names: tuple[str, str] = ("A", "B"), loss: Loss | None = None) -> dict:
    """The loss along A→B (and A→aligned B), the barriers, and each layer's singular-vector alignment
    (module docstring). ``loss(graph, sample, outputs)``: default the label-free loss; ``points``
    includes both endpoints."""
    if points < 2:
        raise ConfigError(f"{WHO}: points must be >= 2, got {points}")
    if top_k < 1:
        raise ConfigError(f"{WHO}: top_k must be >= 1, got {top_k}")
    if not calibration:
        raise ConfigError(f"{WHO}: needs calibration samples to measure the loss")
    tensors_a = {t: x.detach() for t, x in a.tensors().items()}
    ends = {"naive": paired(a, b, names)}
    if aligned is not None:
        ends["aligned"] = paired(a, aligned, (names[0], f"{names[1]} (aligned)"))
    weights = alphas(points)
    out = {"models": list(names), "alphas": weights, "samples": len(calibration)}
    for key, end in ends.items():
        out[key] = loss_path(a, tensors_a, end, calibration, weights, WHO, loss)
    out["layers"] = [{"layer": path, "tensor": target,
                      **{key: singular_alignment(tensors_a[target], end[target], top_k) for key, end in ends.items()}}
                     for target, path in layer_weights(a).items()]
    return out
