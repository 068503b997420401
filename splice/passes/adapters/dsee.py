"""``adapter.dsee``: low-rank plus sparse update (DSEE, https://arxiv.org/abs/2111.00160).

DSEE ("Dually Sparsity-Embedded Efficient Tuning") adds to each weight a LoRA-style low-rank
update ``B A`` and a sparse update ``S`` whose support is the largest-magnitude entries of the
residual ``W − W_r`` of a low-rank decomposition of the pretrained weight (the paper uses
GreBsmo; the truncated SVD gives the best such ``W_r``). ``ΔW = (B A + S) · scale`` in one
``splice::dsee_delta``: A ``[r, in]`` kaiming-uniform and B ``[out, r]`` zero (PEFT's LoRA init),
S stored as values at a fixed ``[out, in]`` mask, zero at start, so outputs are unchanged.
Trainable: ``r (in + out) + nnz`` per layer. ``scale = 1`` (LoRA's ``alpha = r``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.ir.graph import Graph
from splice.passes.adapters._common import ADAPTER_REPORT, check_rank
from splice.passes.adapters._sparse import DSEE, RankDensityConfig, attach_per_layer, count, low_rank, \
    sparse_update, top_k_mask
from splice.passes.adapters.lora import init_lora
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class DseeConfig(RankDensityConfig):
    """DSEE: a LoRA update plus a sparse update on the largest residual entries of each weight."""

    density: float = field(default=0.01, metadata={"help": "fraction of each layer's entries in the sparse part"})


def residual_mask(w, rank: int, k: int):
    """The ``k`` entries of largest ``|W − W_r|`` (what the rank-``rank`` part cannot express)."""
    return top_k_mask((w - low_rank(w, rank)).abs(), k)


@register_pass("adapter.dsee", DseeConfig, reference="https://arxiv.org/abs/2111.00160", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def dsee(graph: Graph, cfg: DseeConfig, ctx: PassContext) -> PassResult:
    gen = ctx.generator()

    def build(path, w):
        check_rank("adapter.dsee", cfg.rank, path, *w.shape)
        a, b, _ = init_lora("default", None, cfg.rank, w.shape[0], w.shape[1], 1.0, gen)
        sparse = sparse_update(residual_mask(w, cfg.rank, count(cfg.density, w.numel())))
        return DSEE, {"A": a, "B": b, **sparse}, {"trainable": a.numel() + b.numel() + sparse["values"].numel()}

    meta = {"rank": cfg.rank, "alpha": float(cfg.rank), "density": cfg.density}
    return PassResult(graph, True, attach_per_layer(graph, cfg, "adapter.dsee", build, meta))
