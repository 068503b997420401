"""``quantize.w8a8``: int8 weights (symmetric, one scale per output channel) and int8
activations quantized per token at run time — SmoothQuant's W8A8 (https://arxiv.org/abs/2211.10438,
per-token dynamic activations; llm-compressor's ``W8A8`` int8 scheme, torchao's
``int8_dynamic_activation_int8_weight``). Usually after ``quantize.smoothquant``, which moves
activation outliers into the weights first: ``-p quantize.smoothquant:alpha=0.5 -p quantize.w8a8``.

Every selected ``aten.linear`` becomes ``splice::w8a8_linear(x, qweight int8 [N, K], w_scale [N],
bias)``; the arithmetic (and why ONNX Runtime reproduces it exactly) is in ``kernels/quant/w8a8.py``.
In ONNX it runs on ORT's integer GEMM (``MatMulIntegerToFloat``, ``kernels/quant/onnx.py``). A weight
read by several linears is quantized once; a weight also read by an embedding (tied LM head)
gets its own int8 copy and the embedding keeps the float table. Quantized layers are refused,
as by every quantizer (quantize the float model).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.metrics import sqnr_db
from splice.ir.select import module_path, select_nodes, validate_targets
from splice.kernels.quant.w8a8 import dequantize_weight, quantize_weight
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass
from splice.passes.quantize._common import QUANT_REPORT, check_not_quantized, replace_node

NAME = "quantize.w8a8"
W8A8_LINEAR = torch.ops.splice.w8a8_linear.default


@dataclass(frozen=True, kw_only=True)
class W8A8Config(PassConfig):
    """W8A8: int8 per-channel weights, int8 per-token dynamic activations (ORT integer matmuls)."""

    bits: int = field(default=8, metadata={"help": "bits of weights and activations; only 8 (ORT's integer GEMM)"})
    targets: str = field(default="linear", metadata={"help": "layers: path globs, re:, !exclude, joined by |"})

    def __post_init__(self):
        if self.bits != 8:
            raise ValueError(f"bits must be 8 (int8 weights and activations), got {self.bits}; "
                             "for 2..8-bit weight-only quantization use quantize.rtn/gptq/awq")
        validate_targets(self.targets)


@register_pass(NAME, W8A8Config, reference="https://arxiv.org/abs/2211.10438",
               report_fields=QUANT_REPORT)
def w8a8(graph: Graph, cfg: W8A8Config, ctx: PassContext) -> PassResult:
    nodes = select_nodes(graph.gm, cfg.targets, ("linear",), NAME)
    for node in nodes:
        check_not_quantized(node, NAME)
    stored, sqnr, before, after = {}, {}, 0, 0
    for node in nodes:
        w_node = node.args[1]
        if w_node.target not in stored:
            w = graph.tensor(w_node.target)
            codes, scale = quantize_weight(w)
            base = w_node.target.removesuffix(".weight")
            stored[w_node.target] = (graph.add_tensor(base + ".qweight", codes),
                                     graph.add_tensor(base + ".w_scale", scale.to(w.dtype)))
            sqnr[module_path(node)] = round(sqnr_db(w.detach().float(), dequantize_weight(codes, scale)), 2)
            before += w.numel() * w.element_size()
            after += codes.numel() + scale.numel() * w.element_size()
        bias = node.args[2] if len(node.args) > 2 else None
        replace_node(graph, node, W8A8_LINEAR, (node.args[0], *stored[w_node.target], bias))
    return PassResult(graph, bool(nodes), {"layers": len(nodes), "weight_bytes_before": before,
                                           "weight_bytes_after": after, "weight_sqnr_db": sqnr})
