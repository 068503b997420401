"""Oscillation dampening and freezing for QAT (Nagel et al., "Overcoming Oscillations in
Quantization-Aware Training", https://arxiv.org/abs/2203.11086), as a ``splice.train`` hook.

With straight-through gradients a latent weight near a rounding boundary can flip between two
codes step after step; at low bits (ViT-like and depthwise layers especially) this corrupts the
batch statistics and the final rounding. Two remedies, both options of ``quantize.qat``:

* ``dampen = λ``: adds ``λ(t) · mean over layers of mean(((clip(w) - sg(fq(w))) / s)²)`` to the
  loss, pulling each latent weight towards the centre of its grid bin (distance in grid steps,
  so λ does not depend on the weights' scale); ``λ(t)`` ramps from 0 to λ on a cosine schedule
  (as the paper anneals it); ``sg`` = stop-gradient, ``clip`` = the grid's range; scales get no
  gradient from it.
* ``freeze_threshold = f``: after every optimizer step each weight's code is compared with the
  previous one; a change in the opposite direction of the last change is an oscillation, and an
  exponential moving average (momentum 0.01) of oscillations per step is its frequency. A weight
  whose frequency exceeds ``f`` is frozen at the centre of the bin of its EMA code (its gradient
  is zeroed and its value restored after every step).
"""
from __future__ import annotations

import math

import torch

from splice.ir.graph import Graph
from splice.ir.train_hooks import TrainHook, register_train_hook
from splice.kernels.quant.fake_quant import fake_quantize, quantize_codes
from splice.kernels.quant.grid import GroupGrid

MOMENTUM = 0.01
_OP = torch.ops.splice.fake_quant_linear.default


class _Layer:
    """One fake-quantized weight: its trainable tensors and oscillation statistics."""

    def __init__(self, graph: Graph, node, *, track: bool = False):
        _, w, s, z, _, self.bits, self.group_size = node.args
        self.weight, self.scales = graph.tensor(w.target), graph.tensor(s.target)
        self.zeros = None if z is None else graph.tensor(z.target)
        if track:  # oscillation statistics, only when freezing is on
            self.codes = self._codes()
            self.direction = torch.zeros_like(self.codes, dtype=torch.int8)
            self.frequency = torch.zeros_like(self.weight, dtype=torch.float32)
            self.ema_codes = self.codes.float()
            self.frozen = torch.zeros_like(self.weight, dtype=torch.bool)
            self.frozen_value = torch.zeros_like(self.weight)

    def _codes(self) -> torch.Tensor:
        return quantize_codes(self.weight.detach(), self.scales.detach(), self.zeros, self.bits, self.group_size)

    def _zero_points(self) -> torch.Tensor:
        grid = GroupGrid(self.bits, self.group_size, self.zeros is None)
        return grid.unpack_zeros(self.zeros, self.scales.shape[1], self.weight).repeat_interleave(self.group_size, 1)

    def dampening(self) -> torch.Tensor:
        s = self.scales.detach().float().repeat_interleave(self.group_size, 1)
        z = self._zero_points()
        ends = torch.stack([(0 - z) * s, ((1 << self.bits) - 1 - z) * s])  # signed scales: either order
        clipped = torch.minimum(torch.maximum(self.weight.float(), ends.amin(0)), ends.amax(0))
        target = fake_quantize(self.weight.detach(), self.scales.detach(), self.zeros, self.bits, self.group_size)
        return (((clipped - target.float()) / s) ** 2).mean()

    @torch.no_grad()
    def track(self, threshold: float) -> None:
        codes = self._codes()
        step = torch.sign(codes - self.codes).to(torch.int8)
        flipped = (step != 0) & (self.direction != 0) & (step != self.direction)
        self.frequency.mul_(1 - MOMENTUM).add_(flipped.float(), alpha=MOMENTUM)
        self.ema_codes.mul_(1 - MOMENTUM).add_(codes.float(), alpha=MOMENTUM)
        self.direction = torch.where(step != 0, step, self.direction)
        self.codes = codes
        new = (self.frequency > threshold) & ~self.frozen
        if new.any():
            s = self.scales.float().repeat_interleave(self.group_size, 1)
            centre = (torch.round(self.ema_codes) - self._zero_points()) * s
            self.frozen_value = torch.where(new, centre.to(self.weight.dtype), self.frozen_value)
            self.frozen |= new
        if self.frozen.any():
            self.weight.copy_(torch.where(self.frozen, self.frozen_value, self.weight))


class OscillationHook(TrainHook):
    def __init__(self, layers: list[_Layer], dampen: float, freeze_threshold: float):
        self.layers, self.dampen, self.freeze_threshold = layers, dampen, freeze_threshold

    def regularizer(self, step: int, total: int) -> torch.Tensor | None:
        if not self.dampen:
            return None
        ramp = 0.5 * (1 - math.cos(math.pi * min(step + 1, total) / total))
        return self.dampen * ramp * torch.stack([layer.dampening() for layer in self.layers]).mean()

    def after_backward(self, step: int, total: int) -> None:
        for layer in self.layers:
            if self.freeze_threshold and layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(layer.frozen, 0)

    def after_step(self, step: int, total: int) -> None:
        if self.freeze_threshold:
            for layer in self.layers:
                layer.track(self.freeze_threshold)

    def frozen_fraction(self) -> float:
        total = sum(layer.frozen.numel() for layer in self.layers)
        return sum(int(layer.frozen.sum()) for layer in self.layers) / max(total, 1)


def _qat_options(graph: Graph) -> dict:
    entries = [h for h in graph.history if h.get("pass") == "quantize.qat"]
    return entries[-1].get("config", {}) if entries else {}


@register_train_hook
def oscillation_hook(graph: Graph) -> OscillationHook | None:
    """The hook for a graph trained after ``quantize.qat`` with ``dampen`` or ``freeze_threshold``."""
    opts = _qat_options(graph)
    dampen, threshold = float(opts.get("dampen", 0.0)), float(opts.get("freeze_threshold", 0.0))
    nodes = [n for n in graph.gm.graph.nodes if n.target == _OP]
    if not nodes or not (dampen or threshold):
        return None
    unique = {n.args[1].target: n for n in nodes}  # tied weights once
    return OscillationHook([_Layer(graph, n, track=threshold > 0) for n in unique.values()], dampen, threshold)
