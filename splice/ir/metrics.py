"""Fidelity metrics between a reference and a test tensor: the one definition every layer uses
(the pipeline's fidelity probe, a pass's weight-error report, eval's per-layer comparison).

All metrics compute in float64 and return plain Python floats.

- ``max_abs``: largest absolute difference.
- ``sqnr_db``: ``10*log10(sum ref^2 / sum (ref-test)^2)``; ``inf`` when identical.
- ``cosine``: mean cosine similarity over rows of the last dim; ``cosine_flat`` over
  everything flattened. A pair of all-zero rows counts as 1, one zero row as 0.
- ``kl_logits``: mean ``KL(softmax(ref) || softmax(test))`` over rows of the last dim.
- ``top1``: fraction of rows whose argmax agrees (logits only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def _pair(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")
    return ref.detach().to(torch.float64), test.detach().to(torch.float64)


def max_abs(ref: torch.Tensor, test: torch.Tensor) -> float:
    r, t = _pair(ref, test)
    return float((r - t).abs().max()) if r.numel() else 0.0


def sqnr_from_energy(signal: float, noise: float) -> float:
    """``10*log10(signal / noise)`` in dB: ``inf`` without noise, ``-inf`` without signal."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    r, t = _pair(ref, test)
    return sqnr_from_energy(float((r * r).sum()), float(((r - t) ** 2).sum()))


def _cos_rows(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    nr, nt = r.norm(dim=-1), t.norm(dim=-1)
    cos = (r * t).sum(-1) / (nr * nt).clamp_min(1e-300)
    both_zero = (nr == 0) & (nt == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos)


def cosine(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean cosine similarity over rows of the last dim."""
    r, t = _pair(ref, test)
    if r.dim() == 0:
        r, t = r.reshape(1), t.reshape(1)
    return float(_cos_rows(r, t).mean())


def cosine_flat(ref: torch.Tensor, test: torch.Tensor) -> float:
    r, t = _pair(ref, test)
    return float(_cos_rows(r.reshape(-1), t.reshape(-1)))


def kl_logits(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean KL(softmax(ref) || softmax(test)) over rows of the last dim, in nats."""
    r, t = _pair(ref, test)
    lp, lq = F.log_softmax(r, dim=-1), F.log_softmax(t, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return max(float(kl.mean()), 0.0)


def top1(ref: torch.Tensor, test: torch.Tensor) -> float:
    r, t = _pair(ref, test)
    return float((r.argmax(-1) == t.argmax(-1)).to(torch.float64).mean())


def compare(ref: torch.Tensor, test: torch.Tensor, logits: bool = False) -> dict[str, float]:
    """All metrics for one tensor pair; ``kl`` and ``top1`` too when ``logits``."""
    out = {"max_abs": max_abs(ref, test), "sqnr_db": sqnr_db(ref, test),
           "cosine": cosine(ref, test), "cosine_flat": cosine_flat(ref, test)}
    if logits:
        out["kl"] = kl_logits(ref, test)
        out["top1"] = top1(ref, test)
    return out


def _named(outputs) -> dict[str, torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return {"output": outputs}
    if isinstance(outputs, Mapping):  # includes transformers ModelOutput
        return {str(k): v for k, v in outputs.items() if isinstance(v, torch.Tensor)}
    if isinstance(outputs, Sequence):
        return {str(i): v for i, v in enumerate(outputs) if isinstance(v, torch.Tensor)}
    raise TypeError(f"cannot compare outputs of type {type(outputs).__name__}")


def compare_outputs(ref_outputs, test_outputs,
                    logits_names: Sequence[str] = ("logits",)) -> dict[str, dict[str, float]]:
    """``compare`` for every tensor output, keyed by name (dict/ModelOutput key, tuple
    index as a string, or ``"output"`` for a lone tensor). Outputs named in
    ``logits_names`` also get ``kl`` and ``top1``."""
    ref, test = _named(ref_outputs), _named(test_outputs)
    if ref.keys() != test.keys():
        raise ValueError(f"output names differ: reference {sorted(ref)} vs test {sorted(test)}")
    return {k: compare(ref[k], test[k], logits=k in logits_names) for k in ref}
