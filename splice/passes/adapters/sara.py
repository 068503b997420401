"""``adapter.sara``: train the small-magnitude weights (SaRA, https://arxiv.org/abs/2409.06633).

SaRA ("Sparse Low-Rank Adaptation") observes that a pretrained model's smallest weights are
largely *ineffective* and re-purposes exactly them: the entries with ``|W| < threshold`` are
trained, everything else stays frozen (``splice::sparse_delta``, values start at zero). The
threshold is absolute (``threshold``) or the per-layer ``density`` quantile of ``|W|`` (the
``density`` fraction of smallest-magnitude entries). SaRA's nuclear-norm regularizer and its
progressive re-selection are training-loop features and not part of the injected adapter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.passes.adapters._sparse import SPARSE, DensityConfig, attach_per_layer, count, sparse_update, top_k_mask
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.adapters._common import ADAPTER_REPORT


@dataclass(frozen=True, kw_only=True)
class SaraConfig(DensityConfig):
    """SaRA: train the weights of smallest magnitude (below a threshold or percentile)."""

    threshold: float = field(default=0.0, metadata={"help": "> 0: train every |w| below it (overrides density)"})

    def __post_init__(self):
        super().__post_init__()
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")


def small_weights_mask(w, density: float, threshold: float):
    """Entries with ``|w| < threshold`` (``threshold > 0``), else the ``density`` fraction of smallest ``|w|``."""
    if threshold > 0:
        return w.abs() < threshold
    return top_k_mask(-w.abs(), count(density, w.numel()))


@register_pass("adapter.sara", SaraConfig, reference="https://arxiv.org/abs/2409.06633", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def sara(graph: Graph, cfg: SaraConfig, ctx: PassContext) -> PassResult:
    def build(path, w):
        mask = small_weights_mask(w, cfg.density, cfg.threshold)
        if not mask.any():
            raise ConfigError(f"adapter.sara: no weight of layer '{path}' is below threshold {cfg.threshold} "
                              f"(smallest |w| = {float(w.abs().min()):.3g})")
        return SPARSE, sparse_update(mask), {"trainable": int(mask.sum()), "largest_trained_abs": float(w.abs()[mask].max())}

    meta = {"density": cfg.density, "threshold": cfg.threshold}
    return PassResult(graph, True, attach_per_layer(graph, cfg, "adapter.sara", build, meta))
