"""ONNX translations of splice ops (onnxscript), keyed by op for ``torch.onnx.export``.

Which ONNX Runtime kernel runs each quantized op (measured with ORT 1.32, see
docs/notes/ort_quant_formats.md):

==============================  ===========================================================
op, bits, group size            ONNX form -> ORT CPU kernel
==============================  ===========================================================
qlinear 2/4/8, g = 2^k >= 16    ``com.microsoft::MatMulNBits`` on splice's packed bytes as-is
qlinear other bits or groups    decode -> ``DequantizeLinear`` (uint8 [K, N], block axis 0)
                                -> ``MatMul``; ORT folds the decode at load and fuses the rest
                                into MatMulNBits bits=8 (file stays packed, RAM is 8-bit)
qembedding 2/4/8, g = 2^k>=16   ``com.microsoft::GatherBlockQuantized`` on the same packed
                                table (a tied LM head's MatMulNBits shares the initializer)
qembedding other                ``Gather`` of decoded uint8 rows -> blocked ``DequantizeLinear``
==============================  ===========================================================

Every form is exact (ORT parity ~1e-7) at ``accuracy_level`` 0; ``export_onnx`` can set
MatMulNBits' ``accuracy_level=4`` (int8 activations, faster, ~1e-3 relative error).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset21 as op
from onnxscript.values import Op, Opset

from splice.kernels import ops  # noqa: F401  (defines torch.ops.splice.*)

OPSET = 21
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


MatMulNBits = contrib_op("MatMulNBits", ["A", "B", "scales", "zero_points?", "g_idx?", "bias?"],
                         {"K": int, "N": int, "bits": int, "block_size": int, "accuracy_level": int})
GatherBlockQuantized = contrib_op("GatherBlockQuantized", ["data", "indices", "scales", "zero_points?"],
                                  {"gather_axis": int, "quantize_axis": int, "block_size": int, "bits": int})


def has_fused_kernel(bits: int, group_size: int) -> bool:
    """Whether ORT's MatMulNBits / GatherBlockQuantized take this format directly."""
    pow2 = group_size >= 16 and group_size & (group_size - 1) == 0
    return bits in (4, 8) and pow2 or (bits == 2 and pow2 and group_size <= 256)


def _const(array: np.ndarray):
    return op.Constant(value=onnx.numpy_helper.from_array(np.ascontiguousarray(array)))


def unpack(packed, n: int, bits: int):
    """Standard-ONNX inverse of ``kernels.packing.pack_bits``: uint8 ``[..., W]`` -> ``[..., n]``
    codes (uint8). Every op here reads initializers only, so ORT folds it at load."""
    if bits == 8:
        return packed
    pos = np.arange(n) * bits
    wide = op.Cast(op.Pad(packed, _const(np.array([0, 1], np.int64)), None, _const(np.array([-1], np.int64))),
                   to=onnx.TensorProto.UINT16)
    lo = op.Gather(wide, _const(pos >> 3), axis=-1)
    hi = op.Gather(wide, _const((pos >> 3) + 1), axis=-1)
    both = op.BitwiseOr(lo, op.BitShift(hi, _const(np.array(8, np.uint16)), direction="LEFT"))
    value = op.BitShift(both, _const((pos & 7).astype(np.uint16)), direction="RIGHT")
    return op.Cast(op.BitwiseAnd(value, _const(np.array((1 << bits) - 1, np.uint16))), to=onnx.TensorProto.UINT8)


def _zero_codes(zeros, n_rows: int, groups: int, bits: int):
    """Zero points as uint8 codes ``[rows, groups]`` (symmetric: ``2**(bits-1)``)."""
    if zeros is None:
        return _const(np.full((n_rows, groups), 1 << (bits - 1), np.uint8))
    return unpack(zeros, groups, bits)


def qlinear(x, qweight, scales, zeros, bias, bits: int, group_size: int):
    n, groups = qweight.shape[0], qweight.shape[1]
    k = groups * group_size
    if has_fused_kernel(bits, group_size):
        return MatMulNBits(x, qweight, scales, zeros, None, bias, K=k, N=n, bits=bits, block_size=group_size)
    codes = op.Reshape(unpack(qweight, group_size, bits), _const(np.array([n, k], np.int64)))
    zero = _zero_codes(zeros, n, groups, bits)
    w = op.DequantizeLinear(op.Transpose(codes, perm=[1, 0]), op.Transpose(scales, perm=[1, 0]),
                            op.Transpose(zero, perm=[1, 0]), axis=0, block_size=group_size)
    y = op.MatMul(x, w)
    return y if bias is None else op.Add(y, bias)


def qembedding(indices, qweight, scales, zeros, bits: int, group_size: int):
    rows, groups = qweight.shape[0], qweight.shape[1]
    dim = groups * group_size
    out_shape = op.Concat(op.Shape(indices), _const(np.array([dim], np.int64)), axis=0)
    if has_fused_kernel(bits, group_size):
        zero3 = None if zeros is None else op.Unsqueeze(unpack(zeros, groups, bits), _const(np.array([-1], np.int64)))
        rows3 = GatherBlockQuantized(qweight, indices, op.Unsqueeze(scales, _const(np.array([-1], np.int64))), zero3,
                                     gather_axis=0, quantize_axis=2, block_size=group_size, bits=bits)
        return op.Reshape(rows3, out_shape)
    codes = op.Reshape(unpack(qweight, group_size, bits), _const(np.array([rows, dim], np.int64)))
    zero = _zero_codes(zeros, rows, groups, bits)
    picked = [op.Gather(t, indices, axis=0) for t in (codes, scales, zero)]
    return op.DequantizeLinear(*picked, axis=-1, block_size=group_size)


TRANSLATIONS = {
    torch.ops.splice.qlinear.default: qlinear,
    torch.ops.splice.qembedding.default: qembedding,
}


def lora_delta(x, A, B, scale):
    """``Gemm(Gemm(x₂, A, transB) · scale, B, transB)`` on ``x`` flattened to 2-D: A and B stay
    initializers under their stored names, in PEFT layout (no transposes for the optimizer to fold)."""
    k, n = A.shape[1], B.shape[0]
    flat = op.CastLike(op.Reshape(x, _const(np.array([-1, k], np.int64))), A)  # A, B, scale: one dtype
    h = op.Mul(op.Gemm(flat, A, transB=1), scale)
    y = op.CastLike(op.Gemm(h, B, transB=1), x)
    return op.Reshape(y, op.Concat(op.Shape(x, end=-1), _const(np.array([n], np.int64)), axis=0))


def folded_adapter(base, tensors, spec: str):
    """Nothing reads a fold record; export keeps a constant that the optimizer removes."""
    return op.Constant(value_float=0.0)


TRANSLATIONS[torch.ops.splice.lora_delta.default] = lora_delta
TRANSLATIONS[torch.ops.splice.folded_adapter.default] = folded_adapter
