"""Plain-torch forwards of the delta ops that read the base layer (``kernels/ops.py``): DoRA
(base output, weight, bias), IA3 and SSF (base output), IA3's feedforward form (base weight).

Each returns what is *added* to the base output ``y = x Wᵀ + b``, times the adapter's 0-d
``scale`` (1 as trained, 0 when switched off), computed in the adapter's dtype as PEFT does.
The forms are written as PEFT 0.21 computes them (same operations, same order) where PEFT has
the method, so the two agree to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def scale_input_forward(x, weight, l, scale):
    """``(x ⊙ (l - 1)) Wᵀ``: the change of ``linear(x ⊙ l, W)`` against ``linear(x, W)``."""
    h = x.to(l.dtype) * (l - 1)
    return (F.linear(h, weight.to(l.dtype)) * scale.to(l.dtype)).to(x.dtype)
