"""``prune.depth``: remove whole blocks of a model's repeated stack (transformer layers), each
removed block's output replaced by its input, so the residual stream skips it and its weights go.

Which blocks, from calibration data flowing through the stack:

* ``score=bi`` — ShortGPT's block influence, ``1 − E[cos(x_in, x_out)]`` over the tokens: the blocks
  that change the hidden state least go (https://arxiv.org/abs/2403.03853);
* ``score=angular`` — the span of ``blocks`` consecutive blocks whose input and output are closest in
  angle, ``arccos(cos)/π`` (https://arxiv.org/abs/2403.17887);
* ``score=random`` — a seeded random choice, the baseline.

The first ``protect_first`` blocks are never removed (early blocks matter most, as
HierarchicalPrune keeps them: https://arxiv.org/abs/2508.04663). Blocks are found from module
paths with an index (``model.layers.3``) and their residual input and output from the graph.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.blocks import Block, stack
from splice.ir.segments import block_of
from splice.ir.sparsity import weight_layers
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass

SCORES = ("bi", "angular", "random")


@dataclass(frozen=True, kw_only=True)
class DepthConfig(PassConfig):
    """Remove whole blocks by block influence, angular distance or at random."""

    blocks: int = field(default=1, metadata={"help": "blocks removed"})
    score: str = field(default="bi", metadata={"help": "bi (block influence), angular (closest span), random"})
    protect_first: int = field(default=1, metadata={"help": "the first blocks never removed"})
    seed: int = field(default=0, metadata={"help": "score=random: its seed"})

    def __post_init__(self):
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.protect_first < 0:
            raise ValueError(f"protect_first must be >= 0, got {self.protect_first}")


@torch.no_grad()
def boundary_cosines(graph: Graph, blocks: list[Block], calibration: list[tuple], span: int) -> torch.Tensor:
    """Mean over calibration tokens of ``cos(x_l, x_{l+span})`` for each start ``l`` (x_0 the first
    block's input, x_{i+1} block i's output)."""
    work = graph.copy()
    by_name = {n.name: n for n in work.gm.graph.nodes}
    points = [by_name[blocks[0].input.name]] + [by_name[b.output.name] for b in blocks]
    output = next(n for n in work.gm.graph.nodes if n.op == "output")
    output.args = (tuple(points),)
    work.finalize()
    total, count = torch.zeros(len(blocks) + 1 - span, dtype=torch.float64), 0
    for sample in calibration:
        xs = [x.reshape(-1, x.shape[-1]).double() for x in work.gm(*sample)]
        total += torch.stack([torch.nn.functional.cosine_similarity(xs[i], xs[i + span], dim=-1).sum()
                              for i in range(len(total))])
        count += xs[0].shape[0]
    return total / max(count, 1)


def choose(graph: Graph, blocks: list[Block], cfg: DepthConfig, calibration) -> tuple[list[int], list[float] | None]:
    """Indices of the blocks to remove and the scores they were chosen by (per block for ``bi``,
    per span start for ``angular``)."""
    free = [i for i in range(cfg.protect_first, len(blocks)) if blocks[i].skippable]
    if cfg.blocks > len(free):
        raise ConfigError(f"prune.depth: blocks={cfg.blocks} but only {len(free)} of the {len(blocks)} blocks may go "
                          f"(protect_first={cfg.protect_first}; a block whose output shape is not its input's stays)")
    if cfg.score == "random":
        return sorted(random.Random(cfg.seed).sample(free, cfg.blocks)), None
    if cfg.score == "bi":
        influence = (1 - boundary_cosines(graph, blocks, calibration, 1)).tolist()
        return sorted(sorted(free, key=lambda i: influence[i])[:cfg.blocks]), influence
    distance = [math.acos(max(-1.0, min(1.0, c))) / math.pi
                for c in boundary_cosines(graph, blocks, calibration, cfg.blocks).tolist()]
    spans = [i for i in range(cfg.protect_first, len(blocks) - cfg.blocks + 1)
             if all(blocks[j].skippable for j in range(i, i + cfg.blocks))]
    if not spans:
        raise ConfigError(f"prune.depth: no {cfg.blocks} consecutive blocks may go (protect_first={cfg.protect_first})")
    start = min(spans, key=lambda i: distance[i])
    return list(range(start, start + cfg.blocks)), distance


def remove_blocks(graph: Graph, blocks: list[Block], removed: list[int]) -> None:
    """Skip each removed block (in place): what read its output reads its input instead; the
    block's ops, weights and pruning masks go."""
    source: dict[int, fx.Node] = {}
    for i, block in enumerate(blocks):
        src = source[i - 1] if i - 1 in source else block.input
        if i in removed:
            block.output.replace_all_uses_with(src, delete_user_cb=lambda u, nodes=block.nodes: u not in nodes)
            source[i] = src
    gone = {blocks[i].path for i in removed}
    for key, node in weight_layers(graph).items():
        if block_of(node) in gone:
            graph.masks.pop(key, None)
    dropped = set().union(*(blocks[i].nodes for i in removed))
    for node in reversed(list(graph.gm.graph.nodes)):  # dropout counts as impure for dead-code elimination
        if node in dropped and not node.users:
            graph.gm.graph.erase_node(node)
    graph.finalize()


def _has_stack(graph: Graph) -> bool:
    try:
        return sum(b.skippable for b in stack(graph, "prune.depth")[1:]) > 0
    except ConfigError:
        return False


def _needs_calibration(cfg: DepthConfig) -> bool:
    return cfg.score != "random"


@register_pass("prune.depth", DepthConfig, reference="https://arxiv.org/abs/2403.03853",
               needs_calibration=_needs_calibration, report_fields={"removed": "blocks removed"},
               applies=Applies("a stack of repeated blocks", kinds=("linear",), check=_has_stack))
def depth(graph: Graph, cfg: DepthConfig, ctx: PassContext) -> PassResult:
    blocks = stack(graph, "prune.depth")
    removed, scores = choose(graph, blocks, cfg, ctx.calibration)
    params = graph.num_params()
    remove_blocks(graph, blocks, removed)
    return PassResult(graph, True, {"removed": [blocks[i].path for i in removed], "blocks_before": len(blocks),
                                    "scores": None if scores is None else [round(x, 5) for x in scores],
                                    "params_before": params, "params_after": graph.num_params()})
