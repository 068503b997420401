"""Shared by the shift-add passes (ShiftAddLLM, https://arxiv.org/abs/2406.05981): the options,
the activation-aware fit (BCQ with GPTQ-style error compensation across columns), and the rewrite
``linear -> splice::bcq_linear`` over packed storage (codes 1 bit per sign-plane entry + scales,
so bytes are what is stored: ``bits × params / 8 + scales``). The data-free fit is
``kernels/reparam/bcq.py``'s ``fit``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.metrics import sqnr_db
from splice.ir.select import module_path, select_nodes, validate_targets
from splice.kernels.reparam.bcq import MAX_BITS, dequantize, fit, fit_groups, nearest_codes, pack_signs, sorted_levels
from splice.passes.base import PassConfig
from splice.passes.instrument.hessian import inverse_hessian_cholesky, without_dead_inputs
from splice.passes.quantize._common import replace_node

aten = torch.ops.aten
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BCQ_REPORT = {"layers": "layers rewritten", "weight_bytes_before": "weight bytes before",
              "weight_bytes_after": "weight bytes after", "bits_per_weight": "stored bits per weight"}


@dataclass(frozen=True, kw_only=True)
class BCQOptions(PassConfig):
    """Options every shift-add pass takes (the bits are the pass's own)."""

    group_size: int = field(default=64, metadata={"help": "input columns per scale group (a multiple of 8); -1 = whole row"})
    iters: int = field(default=10, metadata={"help": "alternating-least-squares rounds (α by least squares, codes by exhaustive search)"})
    pow2: bool = field(default=False, metadata={"help": "power-of-two scales: the pure shift form"})
    scale_dtype: str = field(default="float16", metadata={"help": "stored scales: float16, bfloat16 or float32"})
    calib: bool = field(default=False, metadata={"help": "activation-aware: input Hessians and GPTQ-style column error compensation (needs calibration)"})
    damp: float = field(default=0.01, metadata={"help": "with calib: dampening, fraction of mean diag(H)"})
    targets: str = field(default="linear", metadata={"help": "linear layers: path globs, re:, !exclude, joined by |"})

    def __post_init__(self):
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8):
            raise ValueError(f"group_size must be a positive multiple of 8 or -1 (whole row), got {self.group_size}")
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        validate_targets(self.targets)


def check_bits(bits: int, name: str = "bits") -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be 1..{MAX_BITS} (BCQ bit-planes), got {bits}")


# ------------------------------------------------------------------ activation-aware fit


def fit_compensated(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, iters: int, pow2: bool,
                    damp: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """BCQ of ``w [N, K]`` for inputs of Hessian ``h [K, K]``, GPTQ's way (as ShiftAddLLM does):
    columns left to right; at each group's first column its scales are fitted (ALS) on the
    error-updated weights of the group, then each column takes its nearest level and its error
    ``/ [H⁻¹]_ii`` is spread over the columns not yet fitted (lazy batches of one group).
    Returns packed codes, scales ``[bits, N, G]`` and the number of extra dampings."""
    w, h = without_dead_inputs(w, h)
    n, k = w.shape
    hinv, retries = inverse_hessian_cholesky(h, damp)
    hinv = hinv.float()
    signs = torch.zeros(bits, n, k, dtype=torch.bool)
    alphas = []
    for g0 in range(0, k, group_size):
        g1 = g0 + group_size
        block, err = w[:, g0:g1].clone(), torch.zeros(n, group_size)
        alpha, _ = fit_groups(block, bits, iters, pow2)                   # [N, bits]
        alphas.append(alpha)
        table = sorted_levels(alpha)
        for i in range(group_size):
            s = nearest_codes(block[:, i:i + 1], alpha, table)            # [N, bits, 1]
            q = (alpha.unsqueeze(-1) * s).sum(1).squeeze(-1)
            signs[:, :, g0 + i] = (s[:, :, 0] > 0).T
            err[:, i] = (block[:, i] - q) / hinv[g0 + i, g0 + i]
            block[:, i:].addr_(err[:, i], hinv[g0 + i, g0 + i:g1], alpha=-1)
        w[:, g1:] -= err @ hinv[g0:g1, g1:]
    scales = torch.stack(alphas, 1).permute(2, 0, 1).contiguous()        # [bits, N, G]
    return pack_signs(signs), scales, retries


# ------------------------------------------------------------------------------ rewrite

# (node, float weight [N, K], bits, group size) -> (codes uint8 [bits, N, K/8], scales [bits, N, G])
FitFn = Callable[[fx.Node, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def linear_layers(graph: Graph, targets: str, pass_name: str) -> list[fx.Node]:
    """The selected plain linears (``aten.linear`` on a stored weight); ConfigError naming any
    selected layer that is already rewritten or computes its weight."""
    nodes = select_nodes(graph.gm, targets, ("linear",), pass_name)
    for node in nodes:
        if node.target != aten.linear.default:
            raise ConfigError(f"{pass_name}: '{module_path(node) or node.name}' is already rewritten "
                              f"(by {node.meta.get('splice_pass', 'an earlier pass')}); shift-add takes float linears")
        if getattr(node.args[1], "op", None) != "get_attr":
            raise ConfigError(f"{pass_name}: '{module_path(node) or node.name}' computes its weight; store plain weights first")
    return nodes


def layer_group(group_size: int, k: int, path: str, pass_name: str) -> int:
    """The group size of a layer with ``k`` input features; ConfigError when it does not divide them."""
    g = k if group_size == -1 else group_size
    if k % g or g % 8:
        hint = [d for d in (16, 32, 64, 128, 256) if k % d == 0]
        raise ConfigError(f"{pass_name}: group_size {g} does not divide in_features {k} of '{path}' into groups of "
                          f"a multiple of 8" + (f"; divisors that work: {', '.join(map(str, hint))}" if hint else ""))
    return g


def data_free_fit(cfg: BCQOptions) -> FitFn:
    def solve(node, w, bits, group_size):
        return fit(w, bits, group_size, cfg.iters, cfg.pow2)

    return solve


def rewrite_layers(graph: Graph, nodes: list[fx.Node], cfg: BCQOptions, pass_name: str, solve: FitFn,
                   bits_of: Callable[[str], int]) -> dict:
    """Rewrite ``nodes`` (in place: the pass's own copy) to ``splice::bcq_linear`` with the codes
    and scales ``solve`` fits at ``bits_of(weight target)`` bits; a weight several layers read is
    fitted and stored once. Returns the report."""
    stored: dict[str, tuple[fx.Node, fx.Node, int]] = {}
    sqnr, before, after, params = {}, 0, 0, 0
    for node in nodes:
        target = node.args[1].target
        if target not in stored:
            w = graph.tensor(target).detach()
            g = layer_group(cfg.group_size, w.shape[1], module_path(node), pass_name)
            codes, scales = solve(node, w.float(), bits_of(target), g)
            scales = scales.to(SCALE_DTYPES[cfg.scale_dtype])  # powers of two (pow2) stay exact
            sqnr[module_path(node)] = round(sqnr_db(w.float(), dequantize(codes, scales, g)), 2)
            base = target.removesuffix(".weight")
            stored[target] = (graph.add_tensor(base + ".bcq_codes", codes), graph.add_tensor(base + ".bcq_scales", scales), g)
            before += w.numel() * w.element_size()
            after += codes.numel() + scales.numel() * scales.element_size()
            params += w.numel()
        codes_node, scales_node, g = stored[target]
        bias = node.args[2] if len(node.args) > 2 else None
        replace_node(graph, node, torch.ops.splice.bcq_linear.default, (node.args[0], codes_node, scales_node, bias, g))
    return {"layers": len(nodes), "weight_bytes_before": before, "weight_bytes_after": after,
            "bits_per_weight": round(8 * after / max(params, 1), 4), "weight_sqnr_db": sqnr}
