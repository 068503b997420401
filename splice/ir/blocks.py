"""The repeated block structure of a graph, from module paths and data flow alone: the longest stack
of indexed modules that hold weights (``model.layers.{0..n}``, ``encoder.layer.{i}``, a CNN's
``features.{i}``), each block's nodes and the residual stream entering and leaving it. ``prune.depth``
removes blocks; merging's ``passthrough`` restacks them (``restack``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph, set_attr
from splice.ir.segments import block_of
from splice.ir.sparsity import weight_layers


@dataclass
class Block:
    path: str
    nodes: set[fx.Node]
    input: fx.Node  # the residual stream entering the block
    output: fx.Node  # the residual stream leaving it

    @property
    def skippable(self) -> bool:
        """Whether its output has its input's shape (a downsampling stage does not)."""
        return _shape(self.input) == _shape(self.output)


def _shape(node: fx.Node) -> tuple[str, ...] | None:
    val = node.meta.get("val")
    return tuple(str(d) for d in val.shape) if hasattr(val, "shape") else None


def stack(graph: Graph, who: str) -> list[Block]:
    """The blocks of the graph's longest stack of indexed modules (``model.layers.{0..n}``) that
    hold weights, in order, with their residual input and output."""
    members: dict[str, set[fx.Node]] = {}
    for node in graph.gm.graph.nodes:
        if node.op == "call_function":
            members.setdefault(block_of(node), set()).add(node)
    with_weights = {block_of(n) for n in weight_layers(graph).values()}
    by_prefix: dict[str, list[str]] = {}
    for path in members:
        if path in with_weights and path.rsplit(".", 1)[-1].isdigit():
            by_prefix.setdefault(path.rsplit(".", 1)[0], []).append(path)
    if not by_prefix:
        raise ConfigError(f"{who}: the graph has no stack of repeated blocks (module paths like layers.0, layers.1)")
    paths = max(by_prefix.values(), key=len)
    blocks, previous = [], None
    for path in paths:
        nodes = members[path]
        outs = [n for n in nodes if any(u not in nodes for u in n.users)]
        if len(outs) != 1:
            raise ConfigError(f"{who}: block '{path}' hands {len(outs)} values to the rest of the graph; "
                              "only a block with one output (its residual stream) can be skipped")
        inp = previous if previous is not None else _residual_input(nodes, outs[0], path, who)
        blocks.append(Block(path, nodes, inp, outs[0]))
        previous = outs[0]
    return blocks


def _residual_input(nodes: set[fx.Node], out: fx.Node, path: str, who: str) -> fx.Node:
    """The value from outside the block with the output's shape: the residual stream it adds to."""
    found = {a for n in nodes for a in n.all_input_nodes if a not in nodes and a.op != "get_attr"
             and _shape(a) == _shape(out)}
    if len(found) != 1:
        raise ConfigError(f"{who}: cannot tell the residual input of block '{path}' ({len(found)} candidates)")
    return found.pop()


def _moved_meta(meta: dict, old: str, new: str) -> dict:
    """``meta`` with module paths under block ``old`` moved to block ``new`` (``nn_module_stack``)."""
    out = dict(meta)
    stack_ = meta.get("nn_module_stack")
    if stack_:
        out["nn_module_stack"] = {k: ((new + p[len(old):]) if isinstance(p, str) and (p == old or p.startswith(old + "."))
                                      else p, t) for k, (p, t) in stack_.items()}
    return out


def restack(graph: Graph, blocks: list[Block], plan: list[tuple[int, dict[str, "object"]]]) -> None:
    """Rebuild the stack ``blocks`` of ``graph`` (in place) as ``len(plan)`` blocks: output block
    ``k`` computes the ops of block ``plan[k][0]`` with its stored tensors taken from ``plan[k][1]``
    (block ``j``'s tensor name -> tensor), named ``<stack>.{k}.…``; blocks may repeat, reorder or
    go. What read the last block's output reads the new last one's."""
    g = graph.gm.graph
    prefix = blocks[0].path.rsplit(".", 1)[0]
    original = set().union(*(b.nodes for b in blocks))
    last = blocks[-1].output
    downstream = [u for u in last.users if u not in original]
    current, anchor, staged = blocks[0].input, last, {}
    for k, (j, tensors) in enumerate(plan):
        src, new_path = blocks[j], f"{prefix}.{k}"
        env = {src.input: current}
        for node in [n for n in g.nodes if n in src.nodes]:
            for a in node.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    name = f"{new_path}{a.target[len(src.path):]}" if a.target.startswith(src.path + ".") else a.target
                    if a.target in tensors:
                        if name not in staged:
                            staged[name] = graph.add_tensor(f"_restack_{k}_{len(staged)}", tensors[a.target])
                        env[a] = staged[name]
            with g.inserting_after(anchor):
                copy = g.node_copy(node, lambda a: env.get(a, a))
            copy.meta = _moved_meta(node.meta, src.path, new_path)
            env[node], anchor = copy, copy
        current = env[src.output]
    for user in downstream:
        user.replace_input_with(last, current)
    for node in reversed([n for n in g.nodes if n in original]):
        g.erase_node(node)
    for name, node in staged.items():  # the staged tensors take their block's names now the old ones are gone
        value = graph.tensor(node.target)
        delattr(graph.gm, node.target)
        set_attr(graph.gm, name, value)
        node.target = name
    graph.masks = {k: v for k, v in graph.masks.items() if not k.startswith(prefix + ".")}
    graph.finalize()


def block_tensors(graph: Graph, block: Block) -> dict[str, str]:
    """``{name inside the block: stored tensor}`` of what ``block``'s ops read from its own path
    (``self_attn.q_proj.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    prefix = block.path + "."
    return {a.target[len(prefix):]: a.target for n in block.nodes for a in n.all_input_nodes
            if a.op == "get_attr" and a.target.startswith(prefix)}


def averaged_blocks(graph: Graph, blocks: list[Block], sources: dict[int, list[int]]) -> dict[int, dict[str, "object"]]:
    """For each block ``j`` of ``sources``, its tensors (by name inside the block) as the average
    of blocks ``sources[j]``'s (float tensors; others kept): initial values of shared blocks."""
    import torch

    names = [block_tensors(graph, b) for b in blocks]
    return {j: {rest: torch.stack([graph.tensor(names[k][rest]).detach().float() for k in picked]).mean(0)
                if graph.tensor(target).is_floating_point() else graph.tensor(target)
                for rest, target in names[j].items()} for j, picked in sources.items()}


def check_shareable(graph: Graph, blocks: list[Block], owner: list[int], who: str) -> None:
    """Block ``k`` can read block ``owner[k]``'s tensors: the same names with the same shapes and
    dtypes; else a one-line error naming both."""
    names = [block_tensors(graph, b) for b in blocks]
    for k, o in enumerate(owner):
        if set(names[k]) != set(names[o]):
            odd = sorted(set(names[k]) ^ set(names[o]))[0]
            raise ConfigError(f"{who}: blocks '{blocks[k].path}' and '{blocks[o].path}' differ ('{odd}' is in one only)")
        for rest, target in names[k].items():
            a, b = graph.tensor(target), graph.tensor(names[o][rest])
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ConfigError(f"{who}: cannot share '{target}' {tuple(a.shape)} with '{names[o][rest]}' "
                                  f"{tuple(b.shape)}: shapes differ")


def share_blocks(graph: Graph, blocks: list[Block], owner: list[int], values: dict[int, dict[str, "object"]],
                 who: str) -> int:
    """Make block ``k`` read block ``owner[k]``'s stored tensors (in place): one tensor per name
    inside the block, read by every block that shares it (export stores it once). ``values``: the
    owners' new tensors by name inside the block. Blocks must hold the same tensors with the same
    shapes (``check_shareable``); returns the number of tensors no longer stored."""
    check_shareable(graph, blocks, owner, who)
    names = [block_tensors(graph, b) for b in blocks]
    for o, tensors in values.items():
        for rest, value in tensors.items():
            set_attr(graph.gm, names[o][rest], value.to(graph.tensor(names[o][rest]).dtype))
    before = len(graph.tensors())
    for k, o in enumerate(owner):
        if o != k:
            for node in blocks[k].nodes:
                for a in node.all_input_nodes:
                    if a.op == "get_attr" and a.target in names[k].values():
                        a.target = names[o][a.target[len(blocks[k].path) + 1:]]
    graph.finalize()
    return before - len(graph.tensors())


def uniform_stack(graph: Graph) -> bool:
    """Whether the graph has a stack of at least two blocks holding the same tensors with the same
    shapes (blocks that can share weights)."""
    try:
        blocks = stack(graph, "blocks")
    except ConfigError:
        return False
    shapes = [{rest: tuple(graph.tensor(t).shape) for rest, t in block_tensors(graph, b).items()} for b in blocks]
    return len(blocks) >= 2 and all(s == shapes[0] for s in shapes[1:])
