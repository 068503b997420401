"""``delta.dare``: DARE on a weight delta — drop each entry with probability ``1 − density`` and
rescale the kept ones by ``1 / density``, so the delta's expectation is unchanged (Yu et al.,
"Language models are Super Mario", https://arxiv.org/abs/2311.03099). Seeded per tensor (``seed`` and
the tensor's name), so the same seed gives the same delta; every delta, norms and biases included,
is dropped, and the result is a dense delta (``splice::delta_dense``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.delta._common import (CARRIES_DELTAS, COMPRESS_REPORT, DENSE, DeltaConfig, check_density,
                                         compress, key, seed_for)

WHO = "delta.dare"


@dataclass(frozen=True, kw_only=True)
class DareConfig(DeltaConfig):
    """DARE: drop delta entries at random, rescale the rest by 1/density."""

    density: float = field(default=0.5, metadata={"help": "share of delta entries kept, in (0, 1]"})
    seed: int = field(default=0, metadata={"help": "random seed of the drop masks"})

    def __post_init__(self):
        check_density(self.density)


@register_pass(WHO, DareConfig, reference="https://arxiv.org/abs/2311.03099", requires=("delta",),
               applies=CARRIES_DELTAS, report_fields=COMPRESS_REPORT)
def dare(graph: Graph, cfg: DareConfig, ctx: PassContext) -> PassResult:
    kept = []

    def encode(delta, node):
        keep = torch.rand(delta.shape, generator=seed_for(cfg.seed, key(node))) < cfg.density
        kept.append(float(keep.float().mean()))
        return DENSE, [delta * keep / cfg.density, torch.ones(())]

    tally = compress(graph, WHO, encode, matrices_only=False)
    return PassResult(graph, True, {**tally.report(graph), "kept": round(sum(kept) / len(kept), 4)})
