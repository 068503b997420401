"""``share.layers``: blocks of a stack share their weights in ``groups`` groups, by a ``pattern``
(Takase & Kiyono, "Lessons on Parameter Sharing across Layers in Transformers",
https://arxiv.org/abs/2104.06022; MobileLLM's immediate block-wise sharing,
https://arxiv.org/abs/2402.14905):

* ``sequence`` — consecutive blocks share (``0 0 1 1 2 2``; with groups = N / 2 this is MobileLLM's
  immediate repeat of adjacent blocks);
* ``cycle`` — the group stack repeats (``0 1 2 0 1 2``: a recursive model, as ``recurse.slice``);
* ``cycle_rev`` — repeats mirrored (``0 1 2 2 1 0``).

Each group's shared block starts as the average of its members (``init=average``) or its first
member (``init=first``); every block keeps its ops and reads the group's tensors, stored once
(``ir/blocks.py``'s ``share_blocks``). Uptrain with ``splice train --trainable weights,norms``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from splice.errors import ConfigError
from splice.ir.blocks import averaged_blocks, check_shareable, share_blocks, stack, uniform_stack
from splice.ir.graph import Graph
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass

WHO = "share.layers"
PATTERNS = ("sequence", "cycle", "cycle_rev")


@dataclass(frozen=True, kw_only=True)
class LayersConfig(PassConfig):
    """Blocks share weights in groups: sequence (0 0 1 1), cycle (0 1 0 1) or cycle_rev (0 1 1 0)."""

    pattern: str = field(default="sequence", metadata={"help": "sequence, cycle, cycle_rev"})
    groups: int = field(default=0, metadata={"help": "shared blocks (0: half the stack); must divide the block count"})
    init: str = field(default="average", metadata={"help": "a group's weights from: average (of its members), first"})

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.groups < 0:
            raise ValueError(f"groups must be >= 0, got {self.groups}")
        if self.init not in ("average", "first"):
            raise ValueError(f"init must be average or first, got {self.init!r}")


def owners(pattern: str, n: int, groups: int) -> list[int]:
    """The group of each of ``n`` blocks; a group is named by its first block's index."""
    size = n // groups
    group = {"sequence": [k // size for k in range(n)], "cycle": [k % groups for k in range(n)],
             "cycle_rev": [k % groups if (k // groups) % 2 == 0 else groups - 1 - k % groups for k in range(n)]}[pattern]
    first = {}
    for k, g in enumerate(group):
        first.setdefault(g, k)
    return [first[g] for g in group]


@register_pass(WHO, LayersConfig, reference="https://arxiv.org/abs/2104.06022",
               applies=Applies("a stack of at least two blocks of the same shapes", kinds=("linear",), check=uniform_stack),
               report_fields={"blocks": "blocks in the stack", "groups": "shared blocks",
                              "tensors_removed": "stored tensors removed by sharing"})
def share_layers(graph: Graph, cfg: LayersConfig, ctx: PassContext) -> PassResult:
    blocks = stack(graph, WHO)
    n = len(blocks)
    groups = cfg.groups or n // 2
    if not 1 <= groups < n or n % groups:
        raise ConfigError(f"{WHO}: groups={groups} must divide the {n} blocks of "
                          f"'{blocks[0].path.rsplit('.', 1)[0]}' and be fewer")
    owner = owners(cfg.pattern, n, groups)
    check_shareable(graph, blocks, owner, WHO)
    members = {j: [k for k, o in enumerate(owner) if o == j] for j in sorted(set(owner))}
    sources = members if cfg.init == "average" else {j: [j] for j in members}
    removed = share_blocks(graph, blocks, owner, averaged_blocks(graph, blocks, sources), WHO)
    return PassResult(graph, True, {"blocks": n, "groups": groups, "pattern": cfg.pattern, "owner": owner,
                                    "tensors_removed": removed})
