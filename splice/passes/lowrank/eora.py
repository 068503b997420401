"""``lowrank.eora``: EoRA (https://arxiv.org/abs/2410.21271) — compensate a compressed layer with a
low-rank correction fitted in the eigenspace of its input activations, training-free.

For every selected layer a lossy pass of any family changed (quantized by GPTQ/RTN/AWQ…, pruned by
magnitude/Wanda/SparseGPT…), the error ``ΔW = W − Ŵ`` is read through the weight-access protocol:
``Ŵ`` is what the layer computes with now (``ir.weights.dense_weight``, dequantized or masked), ``W``
the same layer's weight in the graph ``original`` — the pipeline's input by default, so
``quantize.gptq:bits=3 lowrank.eora:rank=32`` in one pipeline needs nothing else; or the model given
by ``original=PATH`` (``graphs={'original': g}``) when the compression ran in an earlier pipeline.

With ``XᵀX = Q Λ Qᵀ`` of the layer's input on the calibration data (gathered on the compressed
graph; Λ damped by ``damp`` × its mean), the error is projected, ``ΔW' = ΔW Q Λ^½``, truncated to
rank r by SVD ``ΔW' ≈ U_r Σ_r V_rᵀ`` (so the rank is spent where the inputs have energy, minimising
``‖(ΔW − B A) X‖`` rather than ``‖ΔW − B A‖``), and mapped back:
``B = U_r Σ_r^½ [out, r]``, ``A = Σ_r^½ V_rᵀ Λ^-½ Qᵀ [r, in]``. ``splice::lowrank_correction``
adds ``x Aᵀ Bᵀ`` to the compressed layer's output, which stays as it is (a quantized weight stays
packed). The report gives each layer's output error on the calibration inputs, ``‖(ΔW − BA) X‖ / ‖ΔW X‖``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import module_path, op_kind, select_nodes, validate_targets
from splice.ir.weights import dense_weight, weight_args
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass
from splice.passes.instrument.calibrate import input_stats
from splice.passes.lowrank._common import check_rank, nbytes

WHO = "lowrank.eora"
CORRECTION = torch.ops.splice.lowrank_correction.default


@dataclass(frozen=True, kw_only=True)
class EoRAConfig(PassConfig):
    """EoRA: a compressed layer's error as a low-rank correction fitted in its input eigenspace (needs calibration)."""

    rank: int = field(default=32, metadata={"help": "rank r of each layer's correction, at most min(in, out)"})
    damp: float = field(default=0.01, metadata={"help": "added to the eigenvalues of XᵀX, as a fraction of their mean"})
    targets: str = field(default="linear|!lm_head", metadata={"help": "layers: kinds, path globs, re:, !exclude, joined by |"})
    original: str = field(default="", metadata={
        "help": "path of the model before compression (default: the pipeline's input graph)"})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        validate_targets(self.targets)


def eora_factors(dw: torch.Tensor, h: torch.Tensor, rank: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [r, in]``, ``B [out, r]`` with ``B A`` the rank-``rank`` approximation of ``dw [out, in]``
    that minimises the output error on inputs of second moment ``h [in, in]`` (module docstring)."""
    lam, q = torch.linalg.eigh((h.double() + h.double().T) / 2)
    lam = lam.clamp_min(0) + damp * float(lam.clamp_min(0).mean()) + 1e-12
    root = lam.sqrt()
    u, s, vh = torch.linalg.svd(dw.double() @ (q * root), full_matrices=False)
    half = s[:rank].sqrt()
    b = u[:, :rank] * half
    a = (half[:, None] * vh[:rank] / root) @ q.T
    return a.float().contiguous(), b.float().contiguous()


def output_error(e: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E H Eᵀ)``: the summed squared output error of weight error ``e`` on inputs of second moment ``h``."""
    e = e.double()
    return float(((e @ h.double()) * e).sum())


def _originals(original: Graph, who: str) -> dict[str, fx.Node]:
    """The first linear-kind op of each module path in the graph ``original`` that stores a weight."""
    out: dict[str, fx.Node] = {}
    for node in original.gm.graph.nodes:
        if op_kind(node) == "linear" and weight_args(node) is not None:
            out.setdefault(module_path(node) or node.name, node)
    return out


def _wide_enough(graph: Graph) -> bool:
    """Whether every linear the default config selects has at least the default rank of inputs and outputs."""
    cfg = EoRAConfig()
    try:
        nodes = select_nodes(graph.gm, cfg.targets, ("linear",), WHO)
    except ConfigError:
        return False
    return all(min(dense_weight(graph, n).shape) >= cfg.rank for n in nodes if weight_args(n) is not None)


def _corrected(node: fx.Node) -> bool:
    return any(u.target == CORRECTION and u.args[0] is node for u in node.users)


@register_pass(WHO, EoRAConfig, reference="https://arxiv.org/abs/2410.21271", needs_calibration=True,
               graphs=("original",), applies=Applies("linear layers of at least 32 (the default rank) inputs and outputs",
                               kinds=("linear",), check=_wide_enough),
               report_fields={"layers": "layers compensated", "added_bytes": "correction bytes",
                              "output_error_kept": "output error kept (mean over layers)"})
def eora(graph: Graph, cfg: EoRAConfig, ctx: PassContext) -> PassResult:
    original = ctx.graphs["original"]
    reference = _originals(original, WHO)
    work: list[tuple[fx.Node, torch.Tensor]] = []
    for node in select_nodes(graph.gm, cfg.targets, ("linear",), WHO):
        path = module_path(node) or node.name
        if weight_args(node) is None or path not in reference or _corrected(node):
            continue
        now = dense_weight(graph, node)
        before = dense_weight(original, reference[path])
        if before.shape != now.shape:
            raise ConfigError(f"{WHO}: layer '{path}' is {tuple(now.shape)} here but {tuple(before.shape)} in the "
                              "original graph; give original= the model this one was compressed from")
        if torch.equal(before, now):
            continue
        check_rank(WHO, cfg.rank, node, tuple(now.shape))
        work.append((node, before - now))
    if not work:
        raise ConfigError(f"{WHO}: no selected layer differs from the original graph, so there is no compression "
                          "error to compensate: run a lossy pass (quantize.gptq, prune.magnitude …) before it in the "
                          "same pipeline, or give original=PATH, the model before compression")
    stats = input_stats(graph, [n for n, _ in work], ctx.calibration, ("hessian",), ctx.cache)
    kept, added = {}, 0
    for node, dw in work:
        s = stats[node.name]
        h = s.hessian() if s.rows else torch.eye(dw.shape[1])  # no inputs seen: plain SVD of the error
        a, b = eora_factors(dw, h, cfg.rank, cfg.damp)
        base = output_error(dw, h)
        kept[module_path(node) or node.name] = round((output_error(dw - b @ a, h) / base) ** 0.5, 6) if base else 0.0
        stem = module_path(node) or node.name
        a_node, b_node = graph.add_tensor(f"{stem}.eora.A", a), graph.add_tensor(f"{stem}.eora.B", b)
        added += nbytes(a) + nbytes(b)
        with graph.gm.graph.inserting_after(node):
            new = graph.gm.graph.call_function(CORRECTION, (node, node.args[0], a_node, b_node))
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    return PassResult(graph, True, {"layers": len(kept), "rank": cfg.rank, "added_bytes": added,
                                    "output_error_kept": round(sum(kept.values()) / len(kept), 6),
                                    "output_error_kept_per_layer": kept})
