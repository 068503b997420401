"""``adapter.hft``: Half Fine-Tuning (HFT, https://arxiv.org/abs/2404.18466).

HFT keeps half of the parameters at their pretrained values to limit forgetting and trains the
other half. The paper picks half of the parameter *matrices* of each transformer block at random.
Here the unit is the *output row* of each targeted layer: a seeded random half of every layer's
rows is trainable (``splice::row_delta``, which computes only those rows; values start at zero),
the other half frozen. Why rows: "half" then holds exactly in every layer, whatever the targets
(a block with an odd number of matrices, or a single targeted layer, has no matrix-level half),
it needs no notion of a "block" (no per-architecture tables), and training costs half a GEMM per
layer. ``rows = floor(out / 2)`` so at least half of each layer stays frozen. Re-run the pass
with another seed (``Pipeline.run(seed=...)``) after folding for the paper's per-round re-selection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splice.ir.graph import Graph
from splice.passes.adapters._common import ADAPTER_REPORT, AdapterConfig
from splice.passes.adapters._sparse import attach_per_layer, channel_update
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class HftConfig(AdapterConfig):
    """Half Fine-Tuning: a seeded random half of each layer's output rows trainable, the rest frozen."""


def half_rows(out_features: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(out_features, dtype=torch.bool)
    mask[torch.randperm(out_features, generator=gen)[:out_features // 2]] = True
    return mask


@register_pass("adapter.hft", HftConfig, reference="https://arxiv.org/abs/2404.18466", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def hft(graph: Graph, cfg: HftConfig, ctx: PassContext) -> PassResult:
    gen = ctx.generator()  # Pipeline.run(seed=...)

    def build(path, w):
        mask = half_rows(w.shape[0], gen)
        method, tensors = channel_update(mask, "out", w)
        return method, tensors, {"trainable": tensors["values"].numel(), "frozen": w.numel() - tensors["values"].numel()}

    return PassResult(graph, True, attach_per_layer(graph, cfg, "adapter.hft", build, {"seed": ctx.seed}))
