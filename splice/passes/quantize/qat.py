"""``quantize.qat``: quantization-aware training with learnable step sizes (LSQ,
https://arxiv.org/abs/1902.08153).

Every selected ``aten.linear`` becomes ``splice::fake_quant_linear(x, weight, scales, zeros,
bias, bits, group_size)``: a trainable float copy of the weight ``[N, K]`` (``<layer>.qat_weight``,
float32) and trainable float32 scales ``[N, K/group_size]`` (``<layer>.qat_scales``), initialised
from ``quantize.rtn``'s min/max grid, so the forward at initialisation equals RTN's dequantized
weights; zero points (asymmetric grids) are fixed and packed as ``splice::qlinear`` stores them.
Train with ``splice.train`` (only those tensors require grad), then ``quantize.convert`` turns
each layer into ``splice::qlinear`` with the learned scales, output for output.

``dampen`` / ``freeze_threshold`` counter weight oscillation around grid decision boundaries
(Nagel et al., https://arxiv.org/abs/2203.11086), which hurts low-bit QAT of ViT-like and
depthwise models; see ``_oscillation.py``. The options are read back from the graph's history by
the training hook, so they survive save/load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import module_path, select_nodes
from splice.passes.base import PassContext, PassResult, register_pass
from splice.passes.quantize import _oscillation  # noqa: F401  (registers the oscillation train hook)
from splice.passes.quantize._common import WeightQuantConfig, check_not_quantized, layer_grid, replace_node

aten = torch.ops.aten
PASS = "quantize.qat"


@dataclass(frozen=True, kw_only=True)
class QATConfig(WeightQuantConfig):
    """Fake-quantize linear weights for training (LSQ learnable scales, straight-through weights)."""

    dampen: float = field(default=0.0, metadata={"help": "weight of the oscillation-dampening regularizer "
                                                           "(Nagel et al.; cosine ramp from 0); 0 = off"})
    freeze_threshold: float = field(default=0.0, metadata={"help": "freeze weights whose oscillation frequency "
                                                                   "(EMA of code flips per step) exceeds this; 0 = off"})

    def __post_init__(self):
        super().__post_init__()
        if self.dampen < 0:
            raise ValueError(f"dampen must be >= 0, got {self.dampen}")
        if not 0 <= self.freeze_threshold < 1:
            raise ValueError(f"freeze_threshold must be in [0, 1), got {self.freeze_threshold}")


@register_pass(PASS, QATConfig, reference="https://arxiv.org/abs/1902.08153",
               report_fields={"layers": "layers fake-quantized", "bits": "bits",
                              "trainable_params": "trainable parameters"})
def qat(graph: Graph, cfg: QATConfig, ctx: PassContext) -> PassResult:
    stored: dict[str, tuple] = {}
    nodes = select_nodes(graph.gm, cfg.targets, ("linear",), PASS)
    for node in nodes:
        check_not_quantized(node, PASS)
        w_node = node.args[1]
        if w_node.op != "get_attr":
            raise ConfigError(f"{PASS}: '{module_path(node)}' has no stored weight (it is computed in the graph)")
        if w_node.target not in stored:
            stored[w_node.target] = _trainable_grid(graph, node, w_node.target, cfg)
        latent, scales, zeros, bits, group_size = stored[w_node.target]
        bias = node.args[2] if len(node.args) > 2 else None
        replace_node(graph, node, torch.ops.splice.fake_quant_linear.default,
                     (node.args[0], latent, scales, zeros, bias, bits, group_size))
    trainable = sum(graph.tensor(n.target).numel() for w, s, *_ in stored.values() for n in (w, s))
    return PassResult(graph, True, {"layers": len(nodes), "bits": cfg.bits, "trainable_params": trainable})


def _trainable_grid(graph: Graph, node, target: str, cfg: QATConfig):
    """Latent weight, scales (both trainable) and packed zeros of one weight, on RTN's grid."""
    w = graph.tensor(target).detach().float()
    grid = layer_grid(cfg, node, w.shape[1], PASS)
    scale, zero = grid.params(w)
    base = target.removesuffix(".weight")
    latent = graph.add_tensor(base + ".qat_weight", w.clone(), trainable=True)
    scales = graph.add_tensor(base + ".qat_scales", scale.contiguous(), trainable=True)
    packed = grid.pack_zeros(zero)
    zeros = None if packed is None else graph.add_tensor(base + ".qat_zeros", packed)
    return latent, scales, zeros, grid.bits, grid.group_size
