"""Plain-torch forwards of the adapter ops that read the base layer (``kernels/adapters/base_ops.py``): DoRA
(base output, weight, bias) and SSF (base output) return what is *added* to the base output
``y = x Wᵀ + b``; IA3 (both forms) and MiSS's Bat *recompute* the layer's output as PEFT 0.21
does (``y·l``; ``linear(x·l, W, b)``; ``linear(x, W + ΔW, b)``), which replaces ``y``.

``scale`` is the adapter's 0-d weight (1 as trained, 0 when switched off). The forms are
PEFT's (same operations, same order), so at ``scale = 1`` splice and PEFT agree bit for bit:
``mix(l, 1) = l·1 + 0 = l`` exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.kernels.adapters.adapter_math import bat_update


def dora_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, lora_scale: torch.Tensor) -> torch.Tensor:
    """``‖W + s·B A‖`` per output row, detached (PEFT's ``DoraLinearLayer.get_weight_norm``; the
    paper's section 4.3 treats the norm as a constant in the backward pass)."""
    return torch.linalg.norm(weight.to(A.dtype) + lora_scale.to(A.dtype) * (B @ A), dim=1).detach()


def dora_forward(x, y, weight, bias, A, B, magnitude, lora_scale, scale):
    """DoRA's delta: ``(m/‖W+sBA‖ - 1)·(y - b) + (m/‖W+sBA‖)·(B A x)·s``, so that
    ``y + delta = m/‖W+sBA‖ · (W + sBA) x + b`` (PEFT ``DoraLinearLayer.forward``)."""
    ratio = magnitude / dora_norm(weight, A, B, lora_scale)
    base = (y if bias is None else y - bias).to(A.dtype)
    lora = F.linear(F.linear(x.to(A.dtype), A), B)
    return (((ratio - 1) * base + ratio * lora * lora_scale.to(A.dtype)) * scale.to(A.dtype)).to(y.dtype)


def scale_shift_forward(y, gamma, beta, scale):
    """``(γ - 1)·y + β`` (``y·γ + β`` added to ``y``), per output channel; ``beta`` may be None."""
    d = (gamma - 1) * y.to(gamma.dtype)
    return ((d if beta is None else d + beta) * scale.to(gamma.dtype)).to(y.dtype)


def mix(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``v`` at ``scale = 1``, ones at ``scale = 0`` (``v·s + 1 - s``; exact at both ends)."""
    s = scale.to(v.dtype)
    return v * s + (1 - s)


def ia3_scale_forward(y, l, scale):
    """IA3 on the output: ``y ⊙ l`` (PEFT ``IA3Layer``: ``result * ia3_scaling``)."""
    return (y * mix(l, scale)).to(y.dtype)


def ia3_ff_forward(y, x, weight, bias, l, scale):
    """IA3 on a feedforward layer's input: ``linear(x ⊙ l, W, b)``; ``y`` is not read."""
    return F.linear((x * mix(l, scale)).to(x.dtype), weight, bias)


def bat_forward(y, x, weight, bias, block, scale):
    """MiSS's Bat: ``linear(x, W + ΔW, b)`` with ``ΔW = bat_update(W, block)``; ``y`` is not read
    (PEFT ``MissLayer.forward``: ``orig_weight + delta_weight``, then ``F.linear``)."""
    w = weight.to(block.dtype)
    return F.linear(x.to(block.dtype), w + bat_update(w, block) * scale.to(block.dtype),
                    None if bias is None else bias.to(block.dtype)).to(x.dtype)
