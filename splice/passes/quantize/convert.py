"""``quantize.convert``: QAT's fake-quantized layers -> real ``splice::qlinear``.

Each ``splice::fake_quant_linear`` (``quantize.qat``) is replaced by ``splice::qlinear`` over the
codes of its trained latent weight on its trained grid: codes packed as every quantizer stores
them, the learned scales (float32), the fixed zero points as they were. The forward is the same
computation (``GroupGrid.quantize`` then ``dequantize``), so outputs match the QAT graph exactly;
the latent weights are dropped. The step after LSQ training (https://arxiv.org/abs/1902.08153),
as torchao's ``convert`` after ``prepare`` in its QAT flow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.kernels.quant.fake_quant import quantize_codes
from splice.kernels.quant.grid import GroupGrid
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.quantize._common import replace_node

PASS = "quantize.convert"


@dataclass(frozen=True, kw_only=True)
class ConvertConfig(PassConfig):
    """Turn QAT's fake-quantized linears into packed splice::qlinear with the learned scales."""


@register_pass(PASS, ConvertConfig, reference="https://arxiv.org/abs/1902.08153", requires=("quantize.qat",),
               report_fields={"layers": "layers converted"})
def convert(graph: Graph, cfg: ConvertConfig, ctx: PassContext) -> PassResult:
    nodes = [n for n in graph.gm.graph.nodes if n.target == torch.ops.splice.fake_quant_linear.default]
    if not nodes:
        raise ConfigError(f"{PASS}: no QAT layers in the graph")
    stored: dict[str, tuple] = {}
    for node in nodes:
        x, w, s, z, bias, bits, group_size = node.args
        if w.target not in stored:
            stored[w.target] = _pack(graph, w.target, s.target, z, bits, group_size)
        replace_node(graph, node, torch.ops.splice.qlinear.default, (x, *stored[w.target], z, bias, bits, group_size))
    return PassResult(graph, True, {"layers": len(nodes)})


def _pack(graph: Graph, weight: str, scales: str, zeros, bits: int, group_size: int):
    """``(qweight, scales)`` nodes: the packed codes and a frozen copy of the learned scales."""
    s = graph.tensor(scales).detach()
    z = None if zeros is None else graph.tensor(zeros.target)
    codes = quantize_codes(graph.tensor(weight).detach(), s, z, bits, group_size)
    base = weight.removesuffix(".qat_weight")
    grid = GroupGrid(bits, group_size, zeros is None)
    return graph.add_tensor(base + ".qweight", grid.pack_codes(codes)), graph.add_tensor(base + ".scales", s.clone())
