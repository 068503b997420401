"""``delta.signature``: Robust Weight Signatures (Cai et al., https://arxiv.org/abs/2302.12480) — the
robustness a model gained by robust training, as a small quantized delta of its shallow layers, added
to another model of the same architecture.

The pass runs on the model that receives the signature. The signature is ``source − base`` (``source``:
the robust model, ``base``: the standard model it was trained from; options ``source=PATH``,
``base=PATH`` or ``graphs={"source": …, "base": …}``) over the stored tensors of the first ``layers``
blocks of the layer stack (``ir/blocks.py``), quantized to ``bits`` bits, symmetric, one scale per row,
and added with ``strength``: each such weight ``W`` becomes ``splice::delta_quant(W, codes, strength ·
scales, bits)``. Tensors are paired by structure with both models (``ir/match.py``).

Signatures combine by addition: a weight that already carries a delta gets the sum, re-quantized to
``bits`` (a sum that is exactly zero leaves the plain weight), so adding the same signature with
``strength=-1`` removes it exactly. A model that carried no delta becomes its own base
(``delta_base.*``, its weights digest recorded): ``Graph.save(path, delta_only=True)`` then writes the
signature alone, which loads onto that model with ``splice.load(path, base=MODEL)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.blocks import stack
from splice.ir.deltas import base_record
from splice.ir.graph import Graph
from splice.ir.match import match_parameters
from splice.kernels.delta.ops import as_matrix, quant_delta
from splice.kernels.quant.packing import pack_bits
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.delta._common import QUANT, attach, base_of, decode, drop, plain_view, rebase, rewrite

WHO = "delta.signature"


@dataclass(frozen=True, kw_only=True)
class SignatureConfig(PassConfig):
    """Robust Weight Signatures: add a quantized shallow-layer delta (robust - standard model) with a strength."""

    source: str = field(default="", metadata={"help": "the robust model the signature comes from (or graphs['source'])"})
    base: str = field(default="", metadata={"help": "the standard model it was trained from (or graphs['base'])"})
    layers: int = field(default=2, metadata={"help": "the signature covers the first this many blocks"})
    bits: int = field(default=8, metadata={"help": "bits per signature weight, 2..8"})
    strength: float = field(default=1.0, metadata={"help": "the signature's weight (-1 removes one added at 1)"})

    def __post_init__(self):
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be 2..8, got {self.bits}")
        if self.strength == 0:
            raise ValueError("strength must not be 0")


def quantize(delta: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed symmetric ``bits``-bit codes of ``delta`` [rows, cols] and its scale per row."""
    top = (1 << (bits - 1)) - 1
    scales = delta.abs().amax(1) / top
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (delta / safe[:, None]).round().clamp(-top, top) + (1 << (bits - 1))
    return pack_bits(codes.to(torch.int32), bits), scales


def shallow_tensors(view: Graph, layers: int) -> list[str]:
    """The float tensors the first ``layers`` blocks of the stack read, in graph order."""
    blocks = stack(view, WHO)
    if layers > len(blocks):
        raise ConfigError(f"{WHO}: layers must be at most {len(blocks)} (the blocks of the model), got {layers}")
    nodes = set().union(*(b.nodes for b in blocks[:layers]))
    out = []
    for node in view.gm.graph.nodes:
        if node in nodes:
            out += [a.target for a in node.all_input_nodes if a.op == "get_attr" and a.target not in out
                    and view.tensor(a.target).is_floating_point()]
    return out


def _pairs(view: Graph, other: Graph, role: str, where: str) -> dict[str, str]:
    """``{view target: other's target}`` paired by structure."""
    return {v: o for o, v in match_parameters(view, other, ("the model", f"{role} '{where}'"), WHO).items()}


@register_pass(WHO, SignatureConfig, reference="https://arxiv.org/abs/2302.12480", graphs=("base", "source"),
               provides=("delta",), report_fields={"tensors": "tensors signed", "signature_bytes": "signature bytes"})
def signature(graph: Graph, cfg: SignatureConfig, ctx: PassContext) -> PassResult:
    if base_record(graph) is None:
        rebase(graph)
    view, index = plain_view(graph)
    base, source = ctx.graphs["base"], ctx.graphs["source"]
    to_base = _pairs(view, base, "base", cfg.base or "graphs['base']")
    to_source = _pairs(view, source, "source", cfg.source or "graphs['source']")
    signed, size, removed = 0, 0, 0
    for target in shallow_tensors(view, cfg.layers):
        sig = as_matrix(source.tensor(to_source[target]).detach().float() - base.tensor(to_base[target]).detach().float())
        if not sig.any():
            continue
        codes, scales = quantize(sig, cfg.bits)
        node = index[target]
        if node.op == "get_attr":
            attach(graph, node, QUANT, [codes, scales * cfg.strength, cfg.bits])
        else:
            total = decode(graph, node) + quant_delta(base_of(graph, node), codes, scales * cfg.strength, cfg.bits)
            if not total.any():
                drop(graph, node)
                removed += 1
                continue
            rewrite(graph, node, QUANT, [*quantize(total, cfg.bits), cfg.bits])
        signed += 1
        size += codes.numel() + scales.numel() * scales.element_size()
    return PassResult(graph, True, {"tensors": signed, "removed": removed, "signature_bytes": size, "bits": cfg.bits,
                                    "layers": cfg.layers, "delta_base_sha256": base_record(graph)["weights_sha256"]})
