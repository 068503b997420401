"""``prune.bip`` and ``prune.bip_finish``: masks and weights learned together by first-order bi-level
optimization (BiP, Zhang et al. 2022, https://arxiv.org/abs/2210.04092).

BiP poses pruning as ``min_m ℓ(m ⊙ θ*(m))`` over masks with ``1ᵀm ≤ k``, where ``θ*(m)`` are the
weights retrained under the mask (the lower level). ``prune.bip`` puts a ``splice::bip_weight`` on
every targeted layer's weight: ``θ ⊙ m``, ``m`` the binary mask of the top ``1 − sparsity`` of the
layer's trainable scores (initialised to ``|θ|``, so training starts from the magnitude mask; the
outputs are the magnitude-pruned model's). ``splice train --trainable adapters,weights`` then runs
BiP's alternation in one loop: one backward gives the weights their lower-level gradient ``m ⊙ g``
(the loop's optimizer steps them: the θ-step) and the scores BiP's implicit gradient
``θ ⊙ g − (1/γ) m ⊙ g²`` (the op's backward; the mixed Hessian with the first-order
Hessian-free assumption of the paper); a training hook (here) takes the scores out of the loop's
optimizer and steps them by projected SGD, ``m ← P_S(m − η ∇)`` onto
``S = {m ∈ [0,1]ⁿ, 1ᵀm ≤ (1 − sparsity)·n}`` per layer (the m-step). Two departures from the paper:
both steps read the same batch (the paper alternates two), and the step is normalized per layer,
``η = mask_lr · mean|m| / mean|∇|``: the raw gradient's scale differs by orders of magnitude between
layers and models (on SmolLM2 a fixed step moving 0.02 % of the mask and one 1000× larger breaking
the model were both seen within five steps), so ``mask_lr`` is the share of the scores' mean
magnitude an average entry moves per step (the gradient is heavy-tailed: its outliers move far
more; 0.01 broke SmolLM2 in 40 steps, 0.001 — the default — halved the perplexity of the same
fine-tuning under the magnitude mask, docs/bench_prune.md). Trained with ``--trainable adapters`` only, the
weights stay fixed and only the mask is learned. ``prune.bip_finish`` turns the scores into the
final masks (top-k, as the forward) and records them like any pruner, so every later pass keeps
them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import module_path
from splice.ir.sparsity import mask_of, prune_layer, weight_layers
from splice.ir.train_hooks import TrainHook, register_train_hook
from splice.ir.weights import layer_key, stored_weight
from splice.kernels.prune.ops import bip_keep
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass
from splice.passes.prune._common import PRUNE_REPORT, PruneConfig, prunable, report, smallest_dropped

BIP = torch.ops.splice.bip_weight.default


@dataclass(frozen=True, kw_only=True)
class BipConfig(PruneConfig):
    """Bi-level pruning: trainable scores on each targeted weight (train, then prune.bip_finish)."""

    targets: str = field(default="linear|conv", metadata={"help": "layers: kinds, path globs, re:, !exclude, joined by |"})
    gamma: float = field(default=1.0, metadata={
        "help": "γ of the lower level's strong convexity: the implicit-gradient term is scaled by 1/γ"})
    mask_lr: float = field(default=0.001, metadata={
        "help": "step of the scores' projected SGD (the m-step), as a share of their mean magnitude per layer"})

    def __post_init__(self):
        super().__post_init__()
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.mask_lr <= 0:
            raise ValueError(f"mask_lr must be > 0, got {self.mask_lr}")


@dataclass(frozen=True, kw_only=True)
class BipFinishConfig(PassConfig):
    """Turn trained BiP scores into masks."""


def bip_nodes(graph: Graph) -> list[fx.Node]:
    return [n for n in graph.gm.graph.nodes if n.target == BIP]


@register_pass("prune.bip", BipConfig, reference="https://arxiv.org/abs/2210.04092",
               report_fields={"layers": "layers given scores", "scores": "trainable scores"},
               applies=Applies("a linear or conv layer", kinds=("linear", "conv")))
def bip(graph: Graph, cfg: BipConfig, ctx: PassContext) -> PassResult:
    inserted: dict[str, fx.Node] = {}
    for node in prunable(graph, cfg, ("linear", "conv"), "prune.bip"):
        path = module_path(node) or node.name
        if mask_of(graph, node) is not None:
            raise ConfigError(f"prune.bip: '{path}' is already pruned; run prune.bip first or leave it out of targets")
        w_node = stored_weight(node)
        if node.target.namespace != "aten" or not graph.tensor(w_node.target).is_floating_point():
            raise ConfigError(f"prune.bip: '{path}' is not a float layer ({node.target}); prune before quantizing")
        if w_node.target not in inserted:
            w = graph.tensor(w_node.target).detach()
            scores = graph.add_tensor(f"{path}.bip_scores", w.abs().float(), trainable=True)
            with graph.gm.graph.inserting_before(node):
                inserted[w_node.target] = graph.gm.graph.call_function(
                    BIP, (w_node, scores, cfg.sparsity, cfg.gamma, cfg.mask_lr))
        node.replace_input_with(w_node, inserted[w_node.target])
    scores = sum(graph.tensor(n.args[1].target).numel() for n in inserted.values())
    return PassResult(graph, True, {"layers": len(inserted), "scores": scores})


@register_pass("prune.bip_finish", BipFinishConfig, reference="https://arxiv.org/abs/2210.04092", requires=("prune.bip",),
               report_fields={**PRUNE_REPORT, "differs_from_magnitude": "share of kept weights magnitude would drop"},
               applies=Applies("a linear or conv layer (given BiP scores by prune.bip)", kinds=("linear", "conv")))
def bip_finish(graph: Graph, cfg: BipFinishConfig, ctx: PassContext) -> PassResult:
    nodes = bip_nodes(graph)
    if not nodes:
        raise ConfigError("prune.bip_finish: the graph has no BiP scores (insert them with prune.bip and train)")
    keys, moved, kept = [], 0, 0
    for bip_node in nodes:
        w_node, scores, sparsity = bip_node.args[:3]
        keep = bip_keep(graph.tensor(scores.target).detach(), sparsity)
        magnitude = smallest_dropped(graph.tensor(w_node.target).detach().abs(), sparsity, per_row=False)
        moved, kept = moved + int((keep & ~magnitude).sum()), kept + int(keep.sum())
        for reader in list(bip_node.users):
            reader.replace_input_with(bip_node, w_node)
            prune_layer(graph, reader, keep)
            keys.append(layer_key(reader))
        graph.gm.graph.erase_node(bip_node)
    graph = graph.finalize()
    final = [weight_layers(graph)[k] for k in keys]
    return PassResult(graph, True, {**report(graph, final), "differs_from_magnitude": round(moved / max(kept, 1), 4)})


def project_budget(scores: torch.Tensor, budget: float) -> None:
    """Euclidean projection of ``scores`` onto ``{s ∈ [0,1]ⁿ, Σ s ≤ budget}``, in place:
    ``clamp(s − μ, 0, 1)`` with ``μ = 0`` when that meets the budget, else the ``μ > 0`` (bisection)
    whose sum is the budget."""
    if float(scores.clamp(0, 1).sum()) > budget:
        lo, hi = 0.0, float(scores.max())
        for _ in range(50):
            mu = (lo + hi) / 2
            lo, hi = (mu, hi) if float((scores - mu).clamp(0, 1).sum()) > budget else (lo, mu)
        scores.sub_(hi)
    scores.clamp_(0, 1)


class BipMaskStep(TrainHook):
    """BiP's m-step (module docstring): the scores' gradients are taken from the loop's optimizer
    after backward and applied by projected SGD after its step."""

    def __init__(self, scored: list[tuple[torch.Tensor, float, float]]):
        self.scored = scored  # (trainable scores, sparsity, mask_lr)
        self.grads: list[torch.Tensor | None] = []

    def after_backward(self, step: int, total: int) -> None:
        self.grads = [s.grad for s, _, _ in self.scored]
        for s, _, _ in self.scored:
            s.grad = None  # the loop's optimizer skips them

    def after_step(self, step: int, total: int) -> None:
        with torch.no_grad():
            for (s, sparsity, lr), g in zip(self.scored, self.grads):
                if g is not None:
                    s.sub_(g * (lr * float(s.abs().mean()) / max(float(g.abs().mean()), 1e-30)))
                    project_budget(s, (1 - sparsity) * s.numel())


@register_train_hook
def _bip_mask_step(graph: Graph) -> TrainHook | None:
    scored = {}
    for node in bip_nodes(graph):
        s = graph.tensor(node.args[1].target)
        if s.requires_grad:
            scored[node.args[1].target] = (s, float(node.args[2]), float(node.args[4]))
    return BipMaskStep(list(scored.values())) if scored else None
