"""Observers: what ``splice::observe`` (``instrument/ops.py``) records while calibration data flows

An instrumented graph carries ``observe(x, key)`` nodes (identity ops). While a
:class:`StatsStore` is active (``with store.recording():``) each call folds ``x`` into the
accumulators registered for ``key``; outside a recording the op does nothing. Kinds:

* ``hessian``  — ``sum XᵀX`` over the rows of ``x`` (flattened to ``[rows, K]``), ``sum ‖x‖⁴`` and the
  row count (GPTQ's ``H = 2 XᵀX / n``; the fourth moment gives its Ledoit–Wolf shrinkage);
* ``sqnorm``   — per-feature ``sum x²`` and the row count (Wanda's ``‖X_j‖²``, without the K×K ``XᵀX``);
* ``act``      — per-channel ``sum |x|`` and ``max |x|`` and the row count (AWQ, SmoothQuant);
* ``mean``     — per-feature signed ``sum x`` and the row count (DAREx's mean input);
* ``inputs``   — up to ``max_rows`` rows of ``x``, sampled evenly, for search-based methods;
* ``rows``     — every row of ``x``, in call order (a float model's inputs, kept for ``asym``);
* ``asym``     — ``sum (X_ref − X)ᵀ X`` where ``X_ref`` is the matching call's rows in the
  ``reference`` store (kind ``rows``, filled first by the float model): GPTAQ's asymmetric term
  (https://arxiv.org/abs/2504.02692), 0 when the quantized and float inputs agree; and the float
  inputs' own ``sum X_refᵀ X_ref`` (``ref_xtx``: a Hessian of the float model's inputs).

A store with ``holdout = k`` routes every k-th calibration sample (index ``k-1, 2k-1, …``, marked
by ``sample_scope`` around each sample's run) into ``LayerStats.held`` instead: statistics of
samples a method did not fit to, on which it chooses between candidate results.
"""
from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import torch

_ACTIVE: list["StatsStore"] = []
_SAMPLE: list[int] = [0]  # the calibration sample running now (innermost ``sample_scope``)
KINDS = ("hessian", "sqnorm", "act", "mean", "inputs", "rows", "asym")


@dataclass
class LayerStats:
    rows: int = 0
    xtx: torch.Tensor | None = None
    norm4: float = 0.0
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None  # Σ x_j² per input feature (kind ``sqnorm``: Wanda's ‖X_j‖²)
    sum: torch.Tensor | None = None  # Σ x_j per input feature (kind ``mean``)
    samples: list[torch.Tensor] = field(default_factory=list)
    dxtx: torch.Tensor | None = None
    ref_xtx: torch.Tensor | None = None
    queue: deque = field(default_factory=deque)
    held: "LayerStats | None" = None  # the held-out samples' statistics (``StatsStore.holdout``)

    def hessian(self) -> torch.Tensor:
        return 2 * self.xtx / max(self.rows, 1)

    def feature_sq(self) -> torch.Tensor:
        """``Σ x_j²`` per input feature: ``sq_sum``, or the diagonal of ``xtx`` when only that was gathered."""
        return self.sq_sum if self.sq_sum is not None else torch.diagonal(self.xtx)

    def shrinkage(self) -> float:
        """Ledoit–Wolf's intensity ``ρ`` for the second moment ``S = XᵀX/n``
        (https://doi.org/10.1016/S0047-259X(03)00096-4): ``(1 − ρ) S + ρ (tr S / K) I`` estimates
        the input's true second moment best from ``n`` rows; ρ grows as the rows get fewer or
        noisier (0 when they determine ``S``)."""
        n = max(self.rows, 1)
        s = self.xtx.double() / n
        mu = float(torch.diagonal(s).mean())
        frob2 = float((s * s).sum())
        spread = frob2 - s.shape[0] * mu * mu  # ‖S − μI‖²
        noise = max(self.norm4 / n - frob2, 0.0) / n  # ‖x xᵀ − S‖² averaged over rows, / n
        return 1.0 if spread <= 0 else min(noise, spread) / spread

    def float_hessian(self) -> torch.Tensor:
        """``2 X_refᵀ X_ref / n`` of the float model's inputs (kind ``asym``)."""
        return 2 * self.ref_xtx / max(self.rows, 1)

    def asymmetry(self) -> torch.Tensor:
        """``2 (X_ref − X)ᵀ X / n``, on the Hessian's scale."""
        return 2 * self.dxtx / max(self.rows, 1)

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)


@dataclass
class StatsStore:
    """Accumulators by observer key; ``kinds`` says what to gather for each key."""

    kinds: dict[str, tuple[str, ...]]
    max_rows: int = 4096
    reference: "StatsStore | None" = None
    holdout: int = 0
    stats: dict[str, LayerStats] = field(default_factory=dict)

    @contextlib.contextmanager
    def recording(self, keys: set[str] | None = None):
        """Record observer calls (only ``keys`` if given) while the block runs."""
        self._only = keys
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.remove(self)

    def update(self, key: str, x: torch.Tensor) -> None:
        kinds = self.kinds.get(key)
        if not kinds or (self._only is not None and key not in self._only):
            return
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        s = self.stats.setdefault(key, LayerStats())
        if held_out(_SAMPLE[-1], self.holdout):
            s.held = s.held or LayerStats()
            s = s.held
        s.rows += rows.shape[0]
        if "hessian" in kinds:
            xtx = rows.T @ rows
            s.xtx = xtx if s.xtx is None else s.xtx + xtx
            s.norm4 += float((rows.double().pow(2).sum(1) ** 2).sum())
        if "sqnorm" in kinds:
            sq = rows.square().sum(0)
            s.sq_sum = sq if s.sq_sum is None else s.sq_sum + sq
        if "mean" in kinds:
            s.sum = rows.sum(0) if s.sum is None else s.sum + rows.sum(0)
        if "act" in kinds:
            a = rows.abs()
            s.abs_sum = a.sum(0) if s.abs_sum is None else s.abs_sum + a.sum(0)
            s.abs_max = a.amax(0) if s.abs_max is None else torch.maximum(s.abs_max, a.amax(0))
        if "inputs" in kinds:
            have = sum(t.shape[0] for t in s.samples)
            if have < self.max_rows:
                step = max(1, rows.shape[0] // max(1, (self.max_rows - have)))
                s.samples.append(rows[::step][: self.max_rows - have].clone())
        if "rows" in kinds:
            s.queue.append(rows.clone())
        if "asym" in kinds:
            ref = self.reference.stats[key].queue.popleft()
            dx, rxtx = ref - rows, ref.T @ ref
            s.dxtx = dx.T @ rows if s.dxtx is None else s.dxtx + dx.T @ rows
            s.ref_xtx = rxtx if s.ref_xtx is None else s.ref_xtx + rxtx

    def pop(self, key: str) -> LayerStats:
        """Take a key's statistics out (bounded memory: consumers pop what they used)."""
        return self.stats.pop(key, LayerStats())


def holdout_every(fraction: float) -> int:
    """``StatsStore.holdout`` for holding out about ``fraction`` of the samples (0: none)."""
    return round(1 / fraction) if fraction > 0 else 0


def held_out(sample: int, every: int) -> bool:
    """Whether calibration sample ``sample`` is held out when every ``every``-th is (0: none)."""
    return bool(every) and sample % every == every - 1


@contextlib.contextmanager
def sample_scope(index: int):
    """Observers inside record for calibration sample ``index`` (stores with ``holdout`` route by it)."""
    _SAMPLE.append(index)
    try:
        yield
    finally:
        _SAMPLE.pop()


def record(key: str, x: torch.Tensor) -> None:
    for store in _ACTIVE:
        store.update(key, x)
