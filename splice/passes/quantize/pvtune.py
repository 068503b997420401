"""``quantize.pvtune``: PV-Tuning — fine-tune the quantized representation itself against
the float model, alternating a continuous and a discrete step, with no straight-through
estimator (Malinovskii et al., https://arxiv.org/abs/2405.14852).

Representation: splice::qlinear's group grid ``W = s·(q − z)`` (``W [N, K]``; scales ``s`` and
integer zero points ``z`` per row and group of ``group_size`` input columns; codes ``q`` in
``0..2**bits−1``; symmetric grids fix ``z = 2**(bits−1)`` and sign ``s``). Training starts from a
quantized point — round-to-nearest (``init=rtn``) or GPTQ (``init=gptq``, the registered pass
run on a copy) — and minimizes the whole model's distillation loss to the float model on the
calibration samples (``Distiller``: KL of ``logits``, MSE of other outputs):

* **P step** (continuous): codes fixed, ``p_steps`` Adam iterations (one calibration sample
  each) on per-group log-scales ``ρ`` (``s = s₀·e^ρ``; zero points stay integers, as stored).
  A P step that does not lower the training loss is undone and retried at half the learning
  rate (Adam's per-coordinate steps have the size of the rate whatever the gradient, so a rate
  that suits a tiny model wrecks a GPTQ start on a real one).
* **V step** (discrete): scales fixed, the gradient ``g = ∂L/∂W`` over all calibration samples;
  the linearized (proximal) step ``W − g/L`` is re-rounded to the grid inside the subspace of
  the ``k`` codes it moves furthest (largest ``|g/s|``), ``L`` set so the k-th moves half a
  grid step: the paper's subspace linearized V step, which replaces the straight-through
  estimator. ``k`` is a trust region: it starts at ``v_fraction`` of the trained weights,
  shrinks ÷4 until the calibration loss drops (none if it never does) and restarts from ``2k``.
  Codes change nowhere else.

The schedule is ``P, then steps × (V, P)``. A ``holdout`` fraction of the calibration samples
is kept out of training: their mean loss is measured at the start, after every V step and at
the end, and the best state seen by it (the start included) is the result, so the pass never
ends above its quantized start on samples it did not train on (early stopping; with
``holdout=0`` the training samples judge, as before). Weights
other ops also read (a tied LM head) keep their start and are not trained (``_finetune.py``);
the loss runs on a private copy of the graph where the head reads its own quantized copy of
the tensor, so training sees the head the result will have while the embedding stays float.
The paper tunes AQLM/QuIP#-style codebooks (reference code: the AQLM repository's PV-Tuning
script); here V steps act on the uniform grid's integer codes and P steps on its scales only.
An already quantized layer is refused (as every quantizer does): quantize the float model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.ir.graph import Graph
from splice.ir.select import select_nodes
from splice.kernels.quant.grid import GroupGrid
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.quantize._calibrate import Solution, solution_lookup
from splice.passes.quantize._common import (QUANT_REPORT, WeightQuantConfig, check_not_quantized, layer_grid,
                                              quantize_layers, stored_solution)
from splice.passes.quantize._finetune import Distiller, split_holdout, trainable_layers
from splice.passes.quantize.gptq import GPTQConfig, gptq
from splice.passes.quantize.rtn import RTNConfig, rtn

PASS = "quantize.pvtune"


@dataclass(frozen=True, kw_only=True)
class PVTuneConfig(WeightQuantConfig):
    """PV-Tuning: alternate scale fitting (P) and restricted code updates (V) on the model's distillation loss."""

    init: Literal["rtn", "gptq"] = field(default="rtn", metadata={"help": "quantized start: round-to-nearest or GPTQ (default options)"})
    steps: int = field(default=4, metadata={"help": "rounds of (V step, P step), after a first P step"})
    p_steps: int = field(default=10, metadata={"help": "Adam iterations on the scales per P step (one calibration sample each)"})
    lr: float = field(default=2e-2, metadata={"help": "Adam learning rate of the log-scales"})
    v_fraction: float = field(default=0.01, metadata={"help": "fraction of the trained weights whose code a V step may change, (0, 1]"})
    holdout: float = field(default=0.25, metadata={"help": "fraction of the calibration samples kept out of training "
                                                            "to choose the best state, [0, 1) (0: the training samples choose)"})

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 0 or self.p_steps < 0:
            raise ValueError(f"steps and p_steps must be >= 0, got steps={self.steps}, p_steps={self.p_steps}")
        if not 0 < self.v_fraction <= 1:
            raise ValueError(f"v_fraction must be in (0, 1], got {self.v_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")


class _Layer:
    """One weight's codes (changed only by V steps) and trainable log-scales around ``scale0``."""

    def __init__(self, solution: Solution, grid: GroupGrid):
        codes, self.scale0, self.zero = solution
        self.codes, self.grid = codes.to(torch.int32), grid
        self.log_scale = torch.zeros_like(self.scale0, requires_grad=True)

    def scale(self) -> torch.Tensor:
        return self.scale0 * torch.exp(self.log_scale)

    def weight(self) -> torch.Tensor:
        """The dequantized weight, differentiable in the log-scales."""
        return self.grid.dequantize(self.codes, self.scale(), self.zero)

    @torch.no_grad()
    def descent(self, grad: torch.Tensor) -> torch.Tensor:
        """How far the gradient step ``W − g`` moves each code, in grid steps (``−g/s``); zero
        where the code is at the end of the grid in that direction."""
        step = -grad / self.scale().repeat_interleave(self.grid.group_size, 1)
        blocked = ((step > 0) & (self.codes == self.grid.maxq)) | ((step < 0) & (self.codes == 0))
        return step.masked_fill(blocked, 0)

    @torch.no_grad()
    def moved(self, step: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Codes nearest to the linearized target inside the subspace ``mask``: each chosen code
        moves ``round(step)`` grid steps, at least one."""
        shift = torch.sign(step) * torch.round(step.abs()).clamp(min=1)
        return torch.where(mask, torch.clamp(self.codes + shift.to(torch.int32), 0, self.grid.maxq), self.codes)

    @torch.no_grad()
    def solution(self) -> Solution:
        return self.codes.clone(), self.scale().clone(), self.zero

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes.clone(), self.log_scale.detach().clone()

    @torch.no_grad()
    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.codes = state[0].clone()
        self.log_scale.copy_(state[1])


INIT = {"rtn": (rtn, RTNConfig), "gptq": (gptq, GPTQConfig)}
P_HALVINGS = 3  # retries of a P step that raised the training loss, each at half the rate


def _start(graph: Graph, cfg: PVTuneConfig, ctx: PassContext, nodes: list) -> dict[str, tuple[Solution, GroupGrid]]:
    """The quantized starting point (and grid) of every selected linear's weight: the ``init``
    pass (default options) run on a copy of the graph."""
    method, config = INIT[cfg.init]
    start = config(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, targets=cfg.targets)
    quantized = method(graph.copy(), start, ctx).graph
    out = {}
    for node in nodes:
        target = node.args[1].target
        grid = layer_grid(cfg, node, graph.tensor(target).shape[1], PASS)
        out[target] = stored_solution(quantized, target, grid), grid
    return out


def _untied(graph: Graph, nodes: list, trainable: dict, start: dict) -> tuple[Graph, dict[str, torch.Tensor]]:
    """A copy of ``graph`` in which each selected linear whose weight other ops also read (a
    tied head) reads a private copy of it, and that copy's quantized start value: the loss then
    sees the head as the result will have it, the embedding beside it still float."""
    work = graph.copy()
    by_name = {n.name: n for n in work.gm.graph.nodes}
    fixed, private = {}, {}
    for node in nodes:
        target = node.args[1].target
        if target in trainable:
            continue
        if target not in private:
            private[target] = work.add_tensor(target + "_quantized", work.tensor(target).detach().clone())
            solution, grid = start[target]
            fixed[private[target].target] = grid.dequantize(*solution)
        copy = by_name[node.name]
        copy.args = (copy.args[0], private[target], *copy.args[2:])
    work.gm.recompile()
    return work, fixed


class _PVTuner:
    """The alternating optimization over every trained layer."""

    def __init__(self, layers: dict[str, _Layer], fixed: dict[str, torch.Tensor], distiller: Distiller,
                 judge: Distiller | None, cfg: PVTuneConfig):
        self.layers, self.fixed, self.distiller, self.judge, self.cfg = layers, fixed, distiller, judge, cfg
        self.lr = cfg.lr  # halved whenever a P step fails to lower the training loss
        self.optimizer = self.adam()
        self.p_rates: list[float] = []  # learning rate each P step was kept at (0: undone)
        self.samples = len(distiller.targets)
        self.sample = 0
        self.size = sum(x.codes.numel() for x in layers.values())
        self.max_changes = max(1, int(cfg.v_fraction * self.size))
        self.budget = self.max_changes  # the V steps' trust region, in codes
        self.scores: list[float] = []  # held-out loss at every checkpoint
        self.best = None  # (held-out loss, training loss, checkpoint index, state)

    def adam(self) -> torch.optim.Adam:
        """A fresh Adam (no moments) over the log-scales at the current rate."""
        return torch.optim.Adam([x.log_scale for x in self.layers.values()], lr=self.lr)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.fixed | {t: x.weight() for t, x in self.layers.items()}

    def p_step(self, loss: float) -> float:
        """``p_steps`` Adam iterations on the log-scales (one calibration sample each), kept only
        if the training loss drops below ``loss``; otherwise undone and retried from the same
        point at half the learning rate, at most ``P_HALVINGS`` times (the scales stay if no try
        lowers the loss). Returns the training loss after the step."""
        if self.cfg.p_steps == 0:
            return loss
        start = {t: x.log_scale.detach().clone() for t, x in self.layers.items()}
        for _ in range(P_HALVINGS + 1):
            for _ in range(self.cfg.p_steps):
                self.optimizer.zero_grad()
                self.distiller.loss(self.sample % self.samples, self.weights()).backward()
                self.optimizer.step()
                self.sample += 1
            trial = self.mean_loss()
            if trial < loss:
                self.p_rates.append(self.lr)
                return trial
            with torch.no_grad():
                for t, x in self.layers.items():
                    x.log_scale.copy_(start[t])
            self.lr /= 2
            self.optimizer = self.adam()
        self.p_rates.append(0.0)
        return loss

    def weight_gradients(self) -> tuple[float, dict[str, torch.Tensor]]:
        """The mean calibration loss at the current weights, and ``∂L/∂W`` there."""
        leaves = {t: x.weight().detach().requires_grad_(True) for t, x in self.layers.items()}
        total = 0.0
        for j in range(self.samples):
            loss = self.distiller.loss(j, self.fixed | leaves) / self.samples
            loss.backward()
            total += float(loss.detach())
        return total, {t: w.grad for t, w in leaves.items()}

    def set_codes(self, codes: dict[str, torch.Tensor]) -> None:
        for t, c in codes.items():
            self.layers[t].codes = c

    def v_step(self) -> tuple[int, float]:
        """The linearized step ``W − g/L`` re-rounded inside the subspace of the ``k`` codes it
        moves furthest (``L`` set so the k-th moves half a grid step); ``k`` starts at the trust
        budget and shrinks ÷4 until the calibration loss drops. Returns (codes changed, training
        loss after)."""
        loss, grads = self.weight_gradients()
        steps = {t: self.layers[t].descent(g) for t, g in grads.items()}
        reach = torch.cat([d.abs().flatten() for d in steps.values()])
        k = min(self.budget, int((reach > 0).sum()))
        top = torch.topk(reach, k)
        before = {t: x.codes for t, x in self.layers.items()}
        while k >= 1:
            mask = torch.zeros_like(reach, dtype=torch.bool)
            mask[top.indices[:k]] = True
            self.set_codes(_moved(self.layers, steps, mask, 0.5 / float(top.values[k - 1])))
            trial = self.mean_loss()
            if trial < loss:
                self.budget = min(2 * k, self.max_changes)
                return k, trial
            self.set_codes(before)
            k = 0 if k == 1 else max(1, k // 4)
        self.budget = 1
        return 0, loss

    def mean_loss(self) -> float:
        return self.distiller.mean_loss(self.weights)

    def state(self) -> dict:
        return {t: x.state() for t, x in self.layers.items()}

    def checkpoint(self, training_loss: float) -> None:
        """Score the current state by the held-out loss (the training loss without held-out
        samples) and keep it if it is the best so far."""
        score = self.judge.mean_loss(self.weights) if self.judge else training_loss
        self.scores.append(score)
        if self.best is None or score < self.best[0]:
            self.best = (score, training_loss, len(self.scores) - 1, self.state())

    def run(self) -> dict:
        """``P, then steps × (V, P)``; the layers end in the state the held-out loss finds best."""
        start = self.mean_loss()
        self.checkpoint(start)
        after_p, after_v, changed = [self.p_step(start)], [], []
        for _ in range(self.cfg.steps):
            count, loss = self.v_step()
            after_v.append(loss)
            changed.append(count)
            self.checkpoint(loss)
            after_p.append(self.p_step(loss))
        self.checkpoint(after_p[-1])
        _, training_loss, chosen, state = self.best
        for t, x in self.layers.items():
            x.restore(state[t])
        report = {"loss_before_after": [round(start, 6), round(training_loss, 6)],
                  "loss_after_each_p_step": [round(v, 6) for v in after_p],
                  "loss_after_each_v_step": [round(v, 6) for v in after_v],
                  "codes_changed_per_v_step": changed, "p_step_learning_rates": self.p_rates,
                  "trained_weights": self.size,
                  "chosen_checkpoint": chosen}
        if self.judge:
            report["held_out_loss_at_checkpoints"] = [round(v, 6) for v in self.scores]
        return report


def _moved(layers: dict[str, _Layer], steps: dict[str, torch.Tensor], mask: torch.Tensor,
           length: float) -> dict[str, torch.Tensor]:
    """Every layer's codes after a step of ``length`` × ``steps`` inside the flat ``mask``
    (all layers' weights in order)."""
    out, start = {}, 0
    for t, step in steps.items():
        n = step.numel()
        out[t] = layers[t].moved(step * length, mask[start:start + n].view_as(step))
        start += n
    return out


@register_pass(PASS, PVTuneConfig, reference="https://arxiv.org/abs/2405.14852", needs_calibration=True,
               report_fields=QUANT_REPORT)
def pvtune(graph: Graph, cfg: PVTuneConfig, ctx: PassContext) -> PassResult:
    t0 = time.perf_counter()
    for node in select_nodes(graph.gm, cfg.targets, ("linear", "embedding"), PASS):
        check_not_quantized(node, PASS)
    nodes, trainable = trainable_layers(graph, cfg, PASS)
    start = _start(graph, cfg, ctx, nodes)
    layers = {t: _Layer(*start[t]) for t in trainable}
    work, fixed = _untied(graph, nodes, trainable, start)
    train, held_out = split_holdout(ctx.calibration, cfg.holdout)
    judge = Distiller(work, held_out) if held_out else None
    history = _PVTuner(layers, fixed, Distiller(work, train), judge, cfg).run()
    solutions = {t: solution for t, (solution, _) in start.items()} | {t: x.solution() for t, x in layers.items()}
    report = quantize_layers(graph, cfg, PASS, solution_lookup(solutions))
    report.update(history, calibration_samples=len(ctx.calibration), held_out_samples=len(held_out), init=cfg.init,
                  seconds=round(time.perf_counter() - t0, 2))
    return PassResult(graph, True, report)
