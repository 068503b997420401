"""Deterministic small tensors for the ops' sample inputs (``OpRecord.sample_inputs``)."""
from __future__ import annotations

import torch


class Sampler:
    """``s = Sampler(); s(2, 3, 8)`` draws ``randn`` tensors from one seeded generator;
    ``s(6, grad=True)`` one that requires grad (a trainable argument); ``s.scalar(0.5)`` a 0-d tensor."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).requires_grad_(grad)

    def mask(self, *shape: int, keep: float = 0.5) -> torch.Tensor:
        """A bool mask with about ``keep`` of its entries True (at least one)."""
        m = torch.rand(*shape, generator=self.gen) < keep
        m.view(-1)[0] = True
        return m

    @staticmethod
    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value)
