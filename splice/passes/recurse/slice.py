"""``recurse.slice``: a stack of N blocks as K = N / ``loops`` shared blocks run ``loops`` times
(Relaxed Recursive Transformers, https://arxiv.org/abs/2410.20672; SReT,
https://arxiv.org/abs/2111.05297). Position ``k`` of the stack runs shared block ``k mod K`` (the
K-block stack looped, "cycle"), its ops kept, its weights read from the shared block's tensors —
stored once in the artifact and the ONNX file (``ir/blocks.py``'s ``share_blocks``).

Shared block ``j`` starts as (``init``) the ``average`` of the blocks it replaces (``j, j + K, …``),
the block at ``j · loops`` (``stepwise``: every loops-th block) or block ``j`` (``lower``). With
``lora_rank`` r > 0 every linear of every position gets a per-loop LoRA (adapter ``name``, an
ordinary ``adapter.lora``: trains, folds and exports as any) initialised by truncated SVD of the
original block's residual from the shared weight, ``B·A`` = its best rank-r approximation, so loops
differ again ("relaxed"); recovery training (``splice train``) then tunes shared weights and LoRAs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.blocks import averaged_blocks, check_shareable, share_blocks, stack, uniform_stack
from splice.ir.graph import Graph
from splice.ir.select import op_kind
from splice.ir.weights import stored_weight
from splice.passes.adapters._inject import inject
from splice.passes.adapters.lora import LORA, LoraConfig
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass

WHO = "recurse.slice"
INITS = ("average", "stepwise", "lower")


@dataclass(frozen=True, kw_only=True)
class SliceConfig(PassConfig):
    """N blocks as N / loops shared blocks looped; optional per-loop LoRA from the residuals' SVD."""

    loops: int = field(default=2, metadata={"help": "times the shared stack runs; must divide the block count"})
    init: str = field(default="average", metadata={"help": "shared block from: average, stepwise (every loops-th), lower"})
    lora_rank: int = field(default=0, metadata={"help": "per-loop LoRA rank on every block linear (0: none)"})
    name: str = field(default="loop", metadata={"help": "the per-loop adapters' name"})

    def __post_init__(self):
        if self.loops < 2:
            raise ValueError(f"loops must be >= 2, got {self.loops}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")


def _sources(owner: list[int], cfg: SliceConfig) -> dict[int, list[int]]:
    """The original blocks each shared block starts from (module docstring's ``init``)."""
    return {j: {"average": [k for k, o in enumerate(owner) if o == j], "stepwise": [j * cfg.loops], "lower": [j]}[cfg.init]
            for j in sorted(set(owner))}


def _truncated(residual: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """LoRA ``A``, ``B`` with ``B·A`` the best rank-``rank`` approximation of ``residual``."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    return {"A": vh[:rank].contiguous(), "B": (u[:, :rank] * s[:rank]).contiguous()}


@register_pass(WHO, SliceConfig, reference="https://arxiv.org/abs/2410.20672",
               applies=Applies("a stack of at least two blocks of the same shapes", kinds=("linear",), check=uniform_stack),
               provides=("adapter",),  # the per-loop LoRAs (lora_rank > 0), which adapter.fold folds
               report_fields={"blocks": "blocks in the stack", "shared_blocks": "shared blocks",
                              "tensors_removed": "stored tensors removed by sharing"})
def recurse_slice(graph: Graph, cfg: SliceConfig, ctx: PassContext) -> PassResult:
    blocks = stack(graph, WHO)
    n = len(blocks)
    if n % cfg.loops:
        raise ConfigError(f"{WHO}: loops={cfg.loops} does not divide the {n} blocks of '{blocks[0].path.rsplit('.', 1)[0]}'")
    k = n // cfg.loops
    owner = [i % k for i in range(n)]
    check_shareable(graph, blocks, owner, WHO)
    values = averaged_blocks(graph, blocks, _sources(owner, cfg))
    linears = [node for b in blocks for node in sorted(b.nodes, key=lambda x: x.name) if op_kind(node) == "linear"]
    residual = {}
    if cfg.lora_rank:
        for node in linears:
            w = graph.tensor(stored_weight(node).target).detach().float()
            if cfg.lora_rank > min(w.shape):
                raise ConfigError(f"{WHO}: lora_rank={cfg.lora_rank} exceeds min(in, out) = {min(w.shape)} of a "
                                  "block linear")
            i = next(i for i, b in enumerate(blocks) if node in b.nodes)
            rest = stored_weight(node).target[len(blocks[i].path) + 1:]
            residual[node] = w - values[owner[i]][rest]
    removed = share_blocks(graph, blocks, owner, values, WHO)
    report = {"blocks": n, "shared_blocks": k, "loops": cfg.loops, "init": cfg.init, "tensors_removed": removed}
    if cfg.lora_rank:
        lora = LoraConfig(name=cfg.name, rank=cfg.lora_rank, alpha=float(cfg.lora_rank), init="default")
        meta = {"rank": cfg.lora_rank, "alpha": float(cfg.lora_rank), "rslora": False, "dropout": 0.0,
                "init": "svd_residual", "scaling": 1.0}
        added = inject(graph, lora, WHO, LORA, ("linear",), lambda layer: _truncated(residual[layer.node], cfg.lora_rank),
                       meta, nodes=linears)
        report["lora_params"] = added.report["trainable_params"]
    return PassResult(graph, True, report)
