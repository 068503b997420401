"""``quantize.reconstruct``: quantize, then fit each block's quantized weights to the float
model's outputs on calibration data — AdaQuant's layer-wise form (https://arxiv.org/abs/2006.10518)
and CBQ's cross-block form (https://arxiv.org/abs/2312.07950) — with bias correction.

Weights start on the round-to-nearest grid. Per layer two tensors train: a rounding offset
``δ [N, K]`` in grid steps (``codes = clamp(round(W/s + δ) + z)``) and a log-scale ``ρ [N, G]``
(``s = s₀·e^ρ``), through a straight-through round: AdaQuant's continuous weight optimization,
in grid units, with learned steps as in LSQ. Blocks (``model.layers.3``) are processed in
order on the outputs of the blocks before them already quantized, with the float model run
in step to give the targets (as ``instrument/calibrate.py``'s sequential mode):

* ``scope=layer`` (AdaQuant): the loss is ``Σ ‖y_q − y_float‖²`` over the window's linears;
* ``scope=block`` (BRECQ/CBQ): the loss is on the values leaving the window (block outputs);
* ``window=w`` (CBQ's cross-block dependency): blocks ``b..b+w−1`` train together, then block
  ``b`` is fixed and the window slides by one, so each block is tuned with the next in view.

Every ``1/holdout``-th calibration sample is not trained on: a window whose loss on those did
not fall is put back (``block_loss_before_after`` reports those losses).

``bias_correction`` (AdaQuant; Nagel et al. https://arxiv.org/abs/1906.04721): once a block
is fixed, each of its linears in order gets ``bias += mean(y_float − y_q)`` over the
calibration tokens (a bias is added where the layer had none). Weights other ops also read
(a tied LM head) stay round-to-nearest and untrained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx

from splice.ir.graph import Graph, set_attr
from splice.ir.segments import SegmentRunner, block_end, blocks
from splice.ir.select import module_path
from splice.kernels.instrument.store import held_out, holdout_every
from splice.kernels.quant.grid import GroupGrid
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.quantize._calibrate import Solution, solution_lookup
from splice.passes.quantize._common import QUANT_REPORT, WeightQuantConfig, pinning, quantize_layers
from splice.passes.quantize._finetune import mse_loss, ste_round, trainable_layers

PASS = "quantize.reconstruct"


@dataclass(frozen=True, kw_only=True)
class ReconstructConfig(WeightQuantConfig):
    """Block-wise (CBQ) or layer-wise (AdaQuant) reconstruction of quantized weights, with bias correction."""

    scope: Literal["layer", "block"] = field(default="block", metadata={"help": "match each linear's output (layer, AdaQuant) or the block output (block)"})
    window: int = field(default=1, metadata={"help": "blocks trained together, sliding by one (CBQ cross-block: 2)"})
    steps: int = field(default=50, metadata={"help": "optimizer steps per window"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the rounding offsets (grid steps); scales use lr/10"})
    bias_correction: bool = field(default=True, metadata={"help": "correct each fixed layer's mean output error with its bias"})
    holdout: float = field(default=0.125, metadata={
        "help": "fraction of calibration samples not trained on: a window is kept only if its loss on them fell (0: "
                "judged on the training samples)"})

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")


class _Layer:
    """One weight's trainable grid: offsets ``δ`` and log-scales ``ρ`` around RTN's grid."""

    def __init__(self, w: torch.Tensor, grid: GroupGrid):
        self.w, self.grid = w, grid
        self.scale0, self.zero = grid.params(w)
        self.offset = torch.zeros_like(w, requires_grad=True)
        self.log_scale = torch.zeros_like(self.scale0, requires_grad=True)

    def _codes_and_scale(self, rounding) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale0 * torch.exp(self.log_scale)
        s = scale.repeat_interleave(self.grid.group_size, 1)
        z = self.zero.repeat_interleave(self.grid.group_size, 1)
        return torch.clamp(rounding(self.w / s + self.offset) + z, 0, self.grid.maxq), scale

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight, differentiable in ``δ`` and ``ρ``."""
        codes, scale = self._codes_and_scale(ste_round)
        return self.grid.dequantize(codes, scale, self.zero)

    @torch.no_grad()
    def solution(self) -> Solution:
        codes, scale = self._codes_and_scale(torch.round)
        return codes.to(torch.int32), scale, self.zero


def _train(runner: SegmentRunner, end: int, read: list[int], targets: list[list[torch.Tensor]],
           layers: dict[str, _Layer], cfg: ReconstructConfig) -> tuple[float, float]:
    """Adam (cosine-annealed) on the window's offsets and scales, over the samples not held out
    (``cfg.holdout``); returns the mean loss before and after on the held-out samples (on the
    others when none are). A window that ends worse there than it started is put back."""
    tensors = [t for x in layers.values() for t in (x.offset, x.log_scale)]
    start = [t.detach().clone() for t in tensors]
    opt = torch.optim.Adam([{"params": tensors[0::2], "lr": cfg.lr}, {"params": tensors[1::2], "lr": cfg.lr / 10}])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.steps, 1))

    def loss_of(sample: int) -> torch.Tensor:
        return mse_loss(runner.replay(sample, end, read, {t: x.weight() for t, x in layers.items()}), targets[sample])

    every = holdout_every(cfg.holdout)
    held = [j for j in range(len(targets)) if held_out(j, every)]
    fit = [j for j in range(len(targets)) if j not in held]

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(j)) for j in held or fit) / len(held or fit)

    first = mean_loss()
    for step in range(cfg.steps):
        opt.zero_grad()
        loss_of(fit[step % len(fit)]).backward()
        opt.step()
        schedule.step()
    last = mean_loss()
    if last > first:
        with torch.no_grad():
            for t, s in zip(tensors, start):
                t.copy_(s)
        last = first
    return first, last


def _set_bias(graph: Graph, node: fx.Node, bias: torch.Tensor) -> None:
    arg = node.args[2] if len(node.args) > 2 else None
    if arg is None:
        node.args = (*node.args[:2], graph.add_tensor(f"{module_path(node) or node.name}.bias", bias))
    else:
        set_attr(graph.gm, arg.target, bias.to(graph.tensor(arg.target).dtype))


def _with_biases(graph: Graph, names: set[str]) -> Graph:
    """A copy of ``graph`` where the linears named ``names`` all read a bias (zeros where they
    had none), so bias correction changes tensors, never the structure the runners walk."""
    out = graph.copy()
    for node in out.gm.graph.nodes:
        if node.name in names and (len(node.args) < 3 or node.args[2] is None):
            _set_bias(out, node, torch.zeros(node.meta["val"].shape[-1]))
    out.gm.recompile()
    return out


def _correct_biases(work: Graph, runner: SegmentRunner, ref: SegmentRunner, members: list[fx.Node],
                    fixed: set[str]) -> dict[str, torch.Tensor]:
    """Layer by layer in graph order: bias += mean output error; returns the new biases by node name."""
    out = {}
    for node in members:
        if node.args[1].target not in fixed:
            continue
        i = runner.nodes.index(node)
        with torch.no_grad():
            diff = [ref.replay(j, i, [i])[0] - runner.replay(j, i, [i])[0] for j in range(len(runner.envs))]
        shift = torch.cat([d.reshape(-1, d.shape[-1]) for d in diff]).mean(0)
        bias = work.tensor(node.args[2].target).detach().float() + shift
        set_attr(work.gm, node.args[2].target, bias)
        out[node.name] = bias
    return out


@register_pass(PASS, ReconstructConfig, reference="https://arxiv.org/abs/2312.07950", needs_calibration=True,
               report_fields=QUANT_REPORT, version=2, migrate=pinning(holdout=0.0))
def reconstruct(graph: Graph, cfg: ReconstructConfig, ctx: PassContext) -> PassResult:
    nodes, weights = trainable_layers(graph, cfg, PASS)
    # float twins of one structure: work's weights get quantized block by block, ref stays float
    work, ref = (_with_biases(graph, {n.name for n in nodes} if cfg.bias_correction else set()) for _ in range(2))
    by_name = {n.name: n for n in work.gm.graph.nodes}
    members_all = [by_name[n.name] for n in nodes]
    layers = {target: _Layer(w, grid) for target, (w, grid) in weights.items()}
    runner, ref_runner = SegmentRunner(work.gm, ctx.calibration), SegmentRunner(ref.gm, ctx.calibration)
    by_block = blocks(work.gm, members_all)
    names = list(by_block)
    ends = [max(block_end(work.gm, b), *(runner.nodes.index(m) for m in by_block[b])) for b in names]
    solutions: dict[str, Solution] = {}
    biases: dict[str, torch.Tensor] = {}
    losses: dict[str, list[float]] = {}
    for i, block in enumerate(names):
        window = names[i:i + cfg.window]
        end = ends[i + len(window) - 1]
        members = [m for b in window for m in by_block[b]]
        read = ([runner.nodes.index(m) for m in members] if cfg.scope == "layer" else runner.live_after(end))
        with torch.no_grad():
            targets = [ref_runner.replay(j, end, read) for j in range(len(ctx.calibration))]
        trainable = {m.args[1].target: layers[m.args[1].target] for m in members if m.args[1].target in layers}
        if trainable:
            losses[block] = [round(v, 6) for v in _train(runner, end, read, targets, trainable, cfg)]
        fixed = {m.args[1].target for m in by_block[block] if m.args[1].target in layers}
        for target in fixed:
            solutions[target] = layers.pop(target).solution()
            set_attr(work.gm, target, GroupGrid.dequantize(trainable[target].grid, *solutions[target]))
        if cfg.bias_correction:
            biases.update(_correct_biases(work, runner, ref_runner, by_block[block], fixed))
        runner.run_to(ends[i])
        ref_runner.run_to(ends[i])
    for node in graph.gm.graph.nodes:
        if node.name in biases:
            _set_bias(graph, node, biases[node.name])
    report = quantize_layers(graph, cfg, PASS, solution_lookup(solutions))
    report["block_loss_before_after"] = losses
    report["bias_corrected_layers"] = len(biases)
    report["calibration_samples"] = len(ctx.calibration)
    return PassResult(graph, True, report)
