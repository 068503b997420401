"""ONNX translations of splice ops (onnxscript), keyed by op for ``torch.onnx.export``.

``splice::qlinear`` lowers to ORT's ``com.microsoft::MatMulNBits`` whose B input has
exactly splice's packed layout ``[N, K/block, block*bits/8]`` (no relayout, honest bytes).
``splice::qembedding`` lowers to ``com.microsoft::GatherBlockQuantized``.
ORT contrib ops have no schema in ``onnx.defs``; ``contrib_op`` declares the part the
exporter needs (inputs, outputs, attributes).
"""
from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op  # noqa: F401  (standard ops for fallbacks)
from onnxscript.values import Op, Opset

_MSFT = Opset("com.microsoft", 1)
_ATTR = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT}


def contrib_op(name: str, inputs: list[str], outputs: list[str], attributes: dict[str, type]) -> Op:
    """An onnxscript Op for ORT contrib op ``name``; input names ending in ``?`` are optional."""
    params = [OpSchema.FormalParameter(i.rstrip("?"), "T", param_option=OpSchema.FormalParameterOption.Optional
                                       if i.endswith("?") else OpSchema.FormalParameterOption.Single)
              for i in inputs]
    types = ["tensor(float)", "tensor(float16)", "tensor(uint8)", "tensor(int32)", "tensor(int64)", "tensor(int8)"]
    schema = OpSchema(name, _MSFT.domain, 1, inputs=params,
                      outputs=[OpSchema.FormalParameter(o, "T") for o in outputs],
                      type_constraints=[("T", types, "any tensor")],
                      attributes=[OpSchema.Attribute(a, _ATTR[t], "", required=False) for a, t in attributes.items()])
    return Op(_MSFT, name, schema)


MatMulNBits = contrib_op("MatMulNBits", ["A", "B", "scales", "zero_points?", "g_idx?", "bias?"], ["Y"],
                         {"K": int, "N": int, "bits": int, "block_size": int, "accuracy_level": int})


def qlinear(x, qweight, scales, zeros, bias, bits: int, group_size: int):
    n, groups = qweight.shape[0], qweight.shape[1]
    return MatMulNBits(x, qweight, scales, zeros, None, bias, K=groups * group_size, N=n, bits=bits,
                       block_size=group_size)


TRANSLATIONS = {
    torch.ops.splice.qlinear.default: qlinear,
}
