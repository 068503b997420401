"""``quantize.awq``: activation-aware weight quantization. https://arxiv.org/abs/2306.00978

As AutoAWQ / llm-compressor run it: linears that read the same input tensor (q/k/v, gate/up,
a lone o_proj/down_proj) form a group; on calibration data, for ``α`` in ``0, 1/grid, …``
the input channels are scaled by ``s = mean|x|^α`` (``duo_scaling``, AutoAWQ's default:
``÷ mean|ŵ|^(1-α)``; normalized so ``max·min = 1``), ``W·diag(s)`` is quantized on the group
grid, and the ``α`` with the least output error ``Σ‖(Q(W·s)/s − W) xᵀ‖²`` over all the group's
layers wins. ``s = 1`` (round-to-nearest) is the first candidate, so the search never does
worse than RTN on the calibration data.
Then (``clip``, AutoAWQ's auto_clip) each layer's per-group clipping range is shrunk in 5%
steps down to half where that lowers the group's partial output error (not for layers
feeding attention scores: q/k). Errors are computed exactly over every calibration token
from the input Hessian ``XᵀX`` (observer kinds ``act`` + ``hessian``), block by block on
the outputs of already-quantized blocks (``sequential``, see ``_calibrate.py``).

``1/s`` must reach the input so the graph computes the same function up to quantization.
It is folded into the op that produces the input when that is exact — an RMSNorm weight
(``mul(weight, normalized)``), a LayerNorm's weight and bias, or a preceding linear's output
rows (and its quantization scales if it is quantized) — reached through ops that keep channels
in place or move them knowably: views/reshapes keeping the last dim, dtype casts, inference
dropout, slices/splits (channel offsets), ReLU (positively homogeneous), either side of an
elementwise product (``silu(gate)·up`` → ``up``), and attention's ``v → o`` path when every
query head has its own value head (no GQA). Every tensor folded into must be read only by
that op, and every value on the way only by the path. Otherwise an explicit
``mul(x, 1/s)`` is inserted before the group. Weights read by other ops too (tied
embeddings) are not scaled or clipped: they are quantized round-to-nearest.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from splice.ir.graph import Graph, attr_users, set_attr
from splice.ir.select import module_path, op_kind, select_nodes
from splice.kernels.observe import LayerStats
from splice.kernels.quant import GroupGrid
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.quantize._calibrate import Solution, solution_lookup, solve_groups
from splice.passes.quantize._common import (
    WeightQuantConfig,
    quantize_layers,
    resolve_group,
)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # AutoAWQ's auto_clip: ratios 1.0, 0.95, ..., 0.55
_NO_CLIP_NAMES = ("q_", "k_", "query", "key", "wqkv")  # AutoAWQ's avoid_clipping, for eager attention


@dataclass(frozen=True, kw_only=True)
class AWQConfig(WeightQuantConfig):
    """AWQ: activation-aware per-channel scaling searched on calibration data, then group-wise quantization."""

    symmetric: bool = field(default=False, metadata={"help": "zero point fixed at 2**(bits-1) (AWQ uses asymmetric grids)"})
    grid: int = field(default=20, metadata={"help": "number of α steps searched in [0, 1)"})
    clip: bool = field(default=True, metadata={"help": "search per-group weight clipping (AutoAWQ auto_clip)"})
    duo_scaling: bool = field(default=False, metadata={"help": "s = mean|x|^α / mean|ŵ|^(1-α) (AutoAWQ's default) instead of mean|x|^α"})
    sequential: bool = field(default=True, metadata={"help": "calibrate block by block on quantized outputs"})

    def __post_init__(self):
        super().__post_init__()
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")


# ------------------------------------------------------------------------------ search


def _fake_quant(w: torch.Tensor, grid: GroupGrid) -> torch.Tensor:
    """``w`` quantized and dequantized on its own min/max grid (``GroupGrid``'s arithmetic,
    broadcast per group instead of repeated per column: this runs ~grid times per layer)."""
    n, k = w.shape
    scale, zero = grid.params(w)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1).to(scale.dtype)
    q = w.reshape(n, -1, grid.group_size) / s
    return q.round_().add_(z).clamp_(0, grid.maxq).sub_(z).mul_(s).reshape(n, k)


def _output_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row of ``delta`` [N, K]: ``δ H δᵀ`` = mean squared output error over the inputs."""
    return (delta @ h).mul_(delta).sum(-1)


def search_scale(w: torch.Tensor, x_mean: torch.Tensor, h: torch.Tensor, grid: GroupGrid, steps: int,
                 duo: bool) -> tuple[float | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Best ``(α, s)`` for the (row-concatenated) group weight ``w`` [N, K], and the output
    error per row of round-to-nearest and of the best scaling. ``α`` and ``s`` are None when
    no scaling beats plain round-to-nearest."""
    rtn = _output_error(_fake_quant(w, grid).sub_(w), h)
    alpha, best_s, best = None, None, rtn
    if duo:
        n, k = w.shape
        g = w.abs().reshape(-1, grid.group_size)
        w_mean = (g / (g.amax(1, keepdim=True) + 1e-6)).reshape(n, k).mean(0)
    for i in range(0 if duo else 1, steps):  # α = 0 without duo scaling is s = 1: the RTN start
        a = i / steps
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if duo else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = _output_error(_fake_quant(w * s, grid).div_(s).sub_(w), h)
        if err.sum() < best.sum():
            alpha, best_s, best = a, s, err
    return alpha, best_s, rtn, best


def search_clip(w: torch.Tensor, h: torch.Tensor, grid: GroupGrid) -> tuple[torch.Tensor, float]:
    """``w`` clipped per (row, group) to the range with the least partial output error
    ``δ_g H_gg δ_gᵀ`` (AutoAWQ's auto_clip); returns it and the mean kept ratio."""
    n, k = w.shape
    g, groups = grid.group_size, k // grid.group_size
    wg = w.reshape(n, groups, g)
    hb = torch.stack([h[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(groups)])  # [G, g, g]
    amax = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((n, groups), float("inf"))
    best_ratio = torch.ones(n, groups, 1)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        ratio = 1 - i / CLIP_GRID
        clipped = torch.maximum(torch.minimum(wg, amax * ratio), -amax * ratio)
        d = (_fake_quant(clipped.reshape(n, k), grid).reshape(n, groups, g) - wg).transpose(0, 1)  # [G, N, g]
        err = ((d @ hb) * d).sum(-1).T  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio[better] = ratio
    lim = amax * best_ratio
    return torch.maximum(torch.minimum(wg, lim), -lim).reshape(n, k), float(best_ratio.mean())


def _feeds_attention_scores(node: fx.Node, depth: int = 16) -> bool:
    """Whether ``node``'s output reaches an attention's query or key (not crossing a layer)."""
    leaf = module_path(node).rsplit(".", 1)[-1].lower()
    if any(name in leaf for name in _NO_CLIP_NAMES):
        return True
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.target == SDPA:
                    if n in user.args[:2]:
                        return True
                elif op_kind(user) is None and user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


# ---------------------------------------------------------------------------- folding


def input_groups(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """``nodes`` grouped by the tensor they read (their first argument), in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        groups.setdefault(node.args[0], []).append(node)
    return list(groups.values())


@dataclass
class _Fold:
    kind: str  # "norm" (mul by a stored vector) | "layer_norm" | "rms_norm" | "linear"
    node: fx.Node  # the op whose stored tensors absorb 1/s
    idx: torch.Tensor  # its output channel for each input channel of the group

    def where(self) -> str:
        return f"{self.kind}:{module_path(self.node) or self.node.name}"


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _last(node) -> int | None:
    v = _val(node)
    return v.shape[-1] if v is not None and v.dim() and isinstance(v.shape[-1], int) else None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = _val(a), _val(b)
    return va is not None and vb is not None and [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def _is_last_dim(node: fx.Node, dim) -> bool | None:
    """Whether ``dim`` is ``node``'s last dim; None when its shape is unknown."""
    v = _val(node)
    if v is None or not isinstance(dim, int) or not v.dim():
        return None
    return dim % v.dim() == v.dim() - 1


def _sole_reader(node: fx.Node, arg, users) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr" and users[arg.target] == [node]


_CASTS = {aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype, aten.to.dtype_layout,
          aten.to.device, aten._to_copy.default, aten.relu.default, aten.contiguous.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.select.int}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
_LAYOUT_KEEPING = (_CASTS - {aten.relu.default}) | {aten.view.default, aten.reshape.default}


def _absorb(node: fx.Node, users) -> str | None:
    """The kind of fold ``node`` can absorb 1/s into (its stored tensors read only by it)."""
    if node.op != "call_function":
        return None
    a = node.args
    if node.target == aten.mul.Tensor and len(a) == 2:
        for attr, other in ((a[0], a[1]), (a[1], a[0])):
            t = _val(attr)
            if _sole_reader(node, attr, users) and isinstance(other, fx.Node) and other is not attr \
                    and t is not None and t.numel() == t.shape[-1] == _last(node):
                return "norm"
    if node.target == aten.layer_norm.default and len(a) > 2 and len(a[1]) == 1 \
            and _sole_reader(node, a[2], users) and (len(a) < 4 or a[3] is None or _sole_reader(node, a[3], users)):
        return "layer_norm"
    if node.target == aten.rms_norm.default and len(a) > 2 and len(a[1]) == 1 and _sole_reader(node, a[2], users):
        return "rms_norm"
    if node.target == aten.linear.default and _sole_reader(node, a[1], users) \
            and (len(a) < 3 or a[2] is None or _sole_reader(node, a[2], users)):
        return "linear"
    return None


def _through(node: fx.Node, idx: torch.Tensor):
    """Where ``node``'s channels ``idx`` come from: ``(producer, its channels, op reading it)``
    for each way through ``node`` that keeps per-channel scaling exact."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return []
    t, a = node.target, node.args
    src = a[0]
    if t in _CASTS or (t == aten.dropout.default and not (len(a) > 2 and a[2])):
        return [(src, idx, node)]
    if t in (aten.mul.Tensor, aten.div.Tensor) and not isinstance(a[1], fx.Node):
        return [(src, idx, node)]
    if t == aten.mul.Tensor and isinstance(a[1], fx.Node) and a[0] is not a[1]:
        return [(x, idx, node) for x in a if _last(x) == _last(node)]
    if t == aten.slice.Tensor:
        last = _is_last_dim(src, a[1] if len(a) > 1 else 0)
        if last is False:
            return [(src, idx, node)]
        start, step = (a[2] if len(a) > 2 and a[2] is not None else 0), (a[4] if len(a) > 4 else 1)
        return [(src, start % _last(src) + idx * step, node)] if last and _last(src) else []
    if t == operator.getitem and isinstance(src, fx.Node) and src.target in _SPLITS:
        split_src, size = src.args[0], src.args[1]
        last = _is_last_dim(split_src, src.args[2] if len(src.args) > 2 else 0)
        others = [u for u in src.users if u is not node]  # must read other channels
        if not last or any(u.target != operator.getitem or u.args[1] == a[1] for u in others):
            return []
        offset = a[1] * size if isinstance(size, int) else sum(size[:a[1]])
        return [(split_src, idx + offset, src)]
    if t in _RESHAPES:
        if t == aten.select.int and _is_last_dim(src, a[1]) is not False:
            return []
        if _last(src) is not None and _last(src) == _last(node):
            return [(src, idx, node)]
        return _through_attention(node, idx)
    return []


def _is_head_transpose(node) -> bool:
    v = _val(node)
    if v is None or v.dim() != 4:
        return False
    if node.target == aten.transpose.int:
        return {node.args[1] % 4, node.args[2] % 4} == {1, 2}
    return node.target == aten.permute.default and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]


def _skip_same_shape(node: fx.Node) -> fx.Node | None:
    """Back from ``node`` through ops that keep its shape and layout; None if a value on
    the way (``node`` included) has another reader."""
    while True:
        if len(node.users) != 1:
            return None
        if not (node.op == "call_function" and node.target in _LAYOUT_KEEPING and _same_shape(node, node.args[0])):
            return node
        node = node.args[0]


def _through_attention(node: fx.Node, idx: torch.Tensor):
    """``o_proj`` input ``[..., H*D]`` <- transpose <- sdpa ``[B, H, S, D]`` <- its value
    ``[B, H, S, D]`` (as many heads: no GQA) <- transpose <- ``[B, S, H, D]`` <- ``v_proj`` output
    ``[..., H*D]``: channel ``h*D + d`` is the same on both sides and attention is linear in
    the value, so scaling value channels scales output channels alike."""
    t = node.args[0]
    if not _is_head_transpose(t) or len(t.users) != 1:
        return []
    h, d = _val(t).shape[2:]
    if not (isinstance(h, int) and isinstance(d, int) and _last(node) == h * d):
        return []
    attn = _skip_same_shape(t.args[0])
    if attn is None or attn.target != SDPA or len(attn.users) != 1 or attn.kwargs.get("enable_gqa", False):
        return []
    q, k, v = attn.args[:3]
    if v is q or v is k or not _same_shape(v, attn) or len(v.users) != 1:
        return []
    vt = _skip_same_shape(v)
    if vt is None or not _is_head_transpose(vt) or len(vt.users) != 1:
        return []
    heads = vt.args[0]  # [..., H, D] <- [..., H*D]: channel h*D + d, as on the o side
    if heads.target not in (aten.view.default, aten.reshape.default) or len(heads.users) != 1 \
            or _last(heads.args[0]) != h * d:
        return []
    return [(heads.args[0], idx, heads)]


def plan_fold(members: list[fx.Node], users) -> _Fold | None:
    """Where the group's ``1/s`` can be folded exactly, or None (insert a Mul)."""
    x = members[0].args[0]
    k = _last(x)
    if k is None:
        return None

    def trace(node, idx, readers, depth=0):
        if depth > 32 or not isinstance(node, fx.Node) or any(u not in readers for u in node.users):
            return None
        kind = _absorb(node, users)
        if kind:
            return _Fold(kind, node, idx)
        for prev, prev_idx, via in _through(node, idx):
            found = trace(prev, prev_idx, {via}, depth + 1)
            if found:
                return found
        return None

    return trace(x, torch.arange(k), set(members))


def _divide(t: torch.Tensor, idx: torch.Tensor, s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """A new tensor: ``t`` with entries ``idx`` along ``dim`` divided by ``s``."""
    out = t.detach().clone()
    shape = [1] * t.dim()
    shape[dim] = -1
    out.index_copy_(dim, idx, (t.detach().float().index_select(dim, idx) / s.reshape(shape)).to(t.dtype))
    return out


def _apply_fold(graph: Graph, fold: _Fold, s: torch.Tensor, solutions: dict[str, Solution]) -> None:
    idx, a = fold.idx, fold.node.args
    if fold.kind == "norm":
        attr = a[0] if isinstance(a[0], fx.Node) and a[0].op == "get_attr" else a[1]
        targets = [(attr.target, -1)]
    elif fold.kind in ("layer_norm", "rms_norm"):
        targets = [(arg.target, -1) for arg in a[2:4] if isinstance(arg, fx.Node)]
    else:  # linear: output rows, its bias, and its quantization scales
        targets = [(a[1].target, 0)] + ([(a[2].target, 0)] if len(a) > 2 and isinstance(a[2], fx.Node) else [])
        if a[1].target in solutions:
            codes, scale, zero = solutions[a[1].target]
            solutions[a[1].target] = (codes, _divide(scale, idx, s, 0), zero)
    for target, dim in targets:
        set_attr(graph.gm, target, _divide(graph.tensor(target), idx, s, dim))


def _insert_mul(graph: Graph, members: list[fx.Node], s: torch.Tensor) -> None:
    x = members[0].args[0]
    w_target = members[0].args[1].target
    dtype = _val(x).dtype if _val(x) is not None else torch.float32
    inv = graph.add_tensor(w_target.removesuffix(".weight") + ".awq_inv_scale", (1 / s).to(dtype))
    with graph.gm.graph.inserting_before(members[0]):
        mul = graph.gm.graph.call_function(aten.mul.Tensor, (x, inv))
    mul.meta["nn_module_stack"] = members[0].meta.get("nn_module_stack", {})
    if _val(x) is not None:
        mul.meta["val"] = _val(x)
    for m in members:
        m.replace_input_with(x, mul)


def migrate_scales(graph: Graph, groups: list[list[fx.Node]], scales: list[torch.Tensor],
                   solutions: dict[str, Solution] | None = None) -> list[str]:
    """For each group (linears of ``graph`` reading one tensor) and its positive scale
    ``s`` [K]: ``W -> W·diag(s)`` for its layers and ``x -> x/s`` on its input, folded where
    exact (see the module docstring), else by an inserted Mul. Edits ``graph`` in place (a
    pass's own copy) with new tensors only; quantization ``solutions`` of folded-into
    linears get their scales divided too. A group whose weights other ops read too (tied)
    is left alone. Returns each group's fold site (``"mul"`` if none, ``"tied"`` if left)."""
    solutions = {} if solutions is None else solutions
    users = attr_users(graph.gm)
    plans = [plan_fold(members, users) for members in groups]  # all planned on the unedited graph
    sites = []
    for members, s, fold in zip(groups, scales, plans):
        s = s.float()
        if _tied(members, users):
            sites.append("tied")
            continue
        for target in dict.fromkeys(m.args[1].target for m in members):
            w = graph.tensor(target)
            set_attr(graph.gm, target, (w.detach().float() * s).to(w.dtype))
        if fold is None:
            _insert_mul(graph, members, s)
            sites.append("mul")
        else:
            _apply_fold(graph, fold, s, solutions)
            sites.append(fold.where())
    graph.gm.recompile()
    return sites


# -------------------------------------------------------------------------------- pass


@register_pass("quantize.awq", AWQConfig, reference="https://arxiv.org/abs/2306.00978", needs_calibration=True)
def awq(graph: Graph, cfg: AWQConfig, ctx: PassContext) -> PassResult:
    nodes = [n for n in select_nodes(graph.gm, cfg.targets, ("linear", "embedding"), "quantize.awq")
             if n.target == aten.linear.default]
    users = attr_users(graph.gm)
    groups = input_groups(nodes)
    by_leader = {members[0].name: members for members in groups}
    tied = {m.name for members in groups if _tied(members, users) for m in members}
    no_clip = {m.name for m in nodes if not cfg.clip or _feeds_attention_scores(m)}
    solutions: dict[str, Solution] = {}
    scales: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}

    def solve_group(members, weights, stats: LayerStats):
        k = weights[0].shape[1]
        grid = GroupGrid(cfg.bits, resolve_group(cfg, k, module_path(members[0]), "quantize.awq"), cfg.symmetric)
        if stats.rows == 0 or members[0].name in tied:  # round to nearest, unscaled
            for node, w in zip(members, weights):
                if node.args[1].target not in solutions:  # else solved with another group
                    scale, zero = grid.params(w)
                    solutions[node.args[1].target] = (grid.quantize(w, scale, zero), scale, zero)
                    layers[module_path(node)] = {"alpha": None, "clip": None,
                                                 "skipped": "tied weight" if stats.rows else "no calibration rows"}
            return [_dequant(solutions[m.args[1].target], grid) for m in members]
        h = stats.hessian()
        alpha, s, rtn, scaled = search_scale(torch.cat(weights), stats.abs_mean(), h, grid, cfg.grid, cfg.duo_scaling)
        if s is None:
            s = torch.ones(k)
        else:
            scales[members[0].name] = s
        h_scaled = h / torch.outer(s, s)  # the statistics of x/s
        out, row = [], 0
        for node, w in zip(members, weights):
            ws, ratio = w * s, None
            if node.name not in no_clip:
                ws, ratio = search_clip(ws, h_scaled, grid)
            scale, zero = grid.params(ws)
            solutions[node.args[1].target] = (grid.quantize(ws, scale, zero), scale, zero)
            out.append(_dequant(solutions[node.args[1].target], grid) / s)
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            ref = float(_output_error(w, h).sum()) or 1.0
            layers[module_path(node)] = {"alpha": alpha, "clip": None if ratio is None else round(ratio, 4),
                                         "err_rtn": _rel(rtn[rows], ref), "err_scaled": _rel(scaled[rows], ref),
                                         "err_awq": _rel(_output_error(out[-1] - w, h), ref)}
        return out

    solve_groups(graph, nodes, ctx.calibration, ("act", "hessian"), solve_group,
                 sequential=cfg.sequential, pass_name="quantize.awq", progress=ctx.progress)
    leaders = [name for name in by_leader if name in scales]
    sites = migrate_scales(graph, [by_leader[n] for n in leaders], [scales[n] for n in leaders], solutions)

    report = quantize_layers(graph, cfg, "quantize.awq", solution_lookup(solutions))
    solved = [v for v in layers.values() if "err_awq" in v]
    report.update({
        "awq_layers": layers,
        "scales_folded": sum(site not in ("mul", "tied") for site in sites),
        "scales_mul": sum(site == "mul" for site in sites),
        "fold_sites": {module_path(by_leader[n][0]): site for n, site in zip(leaders, sites)},
        "mean_err_rtn": _mean([v["err_rtn"] for v in solved]),
        "mean_err_awq": _mean([v["err_awq"] for v in solved]),
        "calibration_samples": len(ctx.calibration),
    })
    return PassResult(graph, True, report)


def _tied(members: list[fx.Node], users) -> bool:
    """Whether ops outside the group read one of its weights."""
    return any(not set(users[m.args[1].target]) <= set(members) for m in members)


def _dequant(solution: Solution, grid: GroupGrid) -> torch.Tensor:
    codes, scale, zero = solution
    return grid.dequantize(codes, scale, zero)


def _rel(err: torch.Tensor, ref: float) -> float:
    return round(float(err.sum()) / ref, 6)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None
