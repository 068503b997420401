"""onnxscript helpers shared by the families' ONNX translations (``kernels/<family>/onnx.py``):
ORT contrib-op declarations, constants, bit unpacking, and the flatten / unflatten of activations
around a ``Gemm``. Imported only by translation modules, so only when a backend asks for them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx.defs import OpSchema
from onnxscript import opset21 as op
from onnxscript.values import Op, Opset

_MSFT = Opset("com.microsoft", 1)
_ATTR = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT}
_TYPES = ["tensor(float)", "tensor(float16)", "tensor(uint8)", "tensor(int32)", "tensor(int64)", "tensor(int8)"]


def contrib_op(name: str, inputs: list[str], attributes: dict[str, type]) -> Op:
    """An onnxscript Op for ORT contrib op ``name`` (ORT contrib ops have no schema in
    ``onnx.defs``); input names ending in ``?`` are optional."""
    params = [OpSchema.FormalParameter(i.rstrip("?"), "T", param_option=OpSchema.FormalParameterOption.Optional
                                       if i.endswith("?") else OpSchema.FormalParameterOption.Single)
              for i in inputs]
    schema = OpSchema(name, _MSFT.domain, 1, inputs=params, outputs=[OpSchema.FormalParameter("Y", "T")],
                      type_constraints=[("T", _TYPES, "any tensor")],
                      attributes=[OpSchema.Attribute(a, _ATTR[t], "", required=False) for a, t in attributes.items()])
    return Op(_MSFT, name, schema)


def const(array: np.ndarray):
    return op.Constant(value=onnx.numpy_helper.from_array(np.ascontiguousarray(array)))


def int64(*values):
    return const(np.array(values, np.int64))


def unpack(packed, n: int, bits: int):
    """Standard-ONNX inverse of ``kernels.quant.packing.pack_bits``: uint8 ``[..., W]`` -> ``[..., n]``
    codes (uint8). Every op here reads initializers only, so ORT folds it at load."""
    if bits == 8:
        return packed
    pos = np.arange(n) * bits
    wide = op.Cast(op.Pad(packed, const(np.array([0, 1], np.int64)), None, const(np.array([-1], np.int64))),
                   to=onnx.TensorProto.UINT16)
    lo = op.Gather(wide, const(pos >> 3), axis=-1)
    hi = op.Gather(wide, const((pos >> 3) + 1), axis=-1)
    both = op.BitwiseOr(lo, op.BitShift(hi, const(np.array(8, np.uint16)), direction="LEFT"))
    value = op.BitShift(both, const((pos & 7).astype(np.uint16)), direction="RIGHT")
    return op.Cast(op.BitwiseAnd(value, const(np.array((1 << bits) - 1, np.uint16))), to=onnx.TensorProto.UINT8)


def as_2d(x, k: int, like):
    """``x`` flattened to ``[-1, k]`` in ``like``'s dtype."""
    return op.CastLike(op.Reshape(x, const(np.array([-1, k], np.int64))), like)


def as_nd(y, x, n: int):
    """``y [rows, n]`` back to ``x``'s leading shape and dtype."""
    return op.Reshape(op.CastLike(y, x), op.Concat(op.Shape(x, end=-1), const(np.array([n], np.int64)), axis=0))
