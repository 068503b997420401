"""The gate of ``splice::channel_gate`` (shared by the op and its ONNX translation): the deterministic
hard-concrete gate of L0 regularization (Louizos et al., https://arxiv.org/abs/1712.01312),
``clamp(σ(a)·(ζ−γ)+γ, 0, 1)``, exactly 0 or 1 once ``a`` is far enough from 0, so closed channels
are removable exactly. Gradients pass the clamp straight through, so a gate at exactly 1 (how they
start) still learns.
"""
from __future__ import annotations

import torch

GATE_LOW, GATE_HIGH = -0.1, 1.1  # γ, ζ: the stretch that lets the gate reach 0 and 1


def gate_values(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gates in [0, 1]; their gradient is the stretched sigmoid's (straight through the clamp)."""
    stretched = torch.sigmoid(log_alpha) * (GATE_HIGH - GATE_LOW) + GATE_LOW
    return stretched + (stretched.clamp(0, 1) - stretched).detach()
