"""ONNX translations of the quantized ops (onnxscript), declared in their registry records
(``quant/ops.py``) and imported only when the ONNX exporter asks.

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
from onnxscript import opset21 as op

from splice.kernels._onnx import const, contrib_op, unpack

MatMulNBits = contrib_op("MatMulNBits", ["A", "B", "scales", "zero_points?", "g_idx?", "bias?"],
                         {"K": int, "N": int, "bits": int, "block_size": int, "accuracy_level": int})
GatherBlockQuantized = contrib_op("GatherBlockQuantized", ["data", "indices", "scales", "zero_points?"],
                                  {"gather_axis": int, "quantize_axis": int, "block_size": int, "bits": int})
MatMulIntegerToFloat = contrib_op("MatMulIntegerToFloat", ["A", "B", "a_scale", "b_scale", "a_zero_point?",
                                                          "b_zero_point?", "bias?"], {})


def has_fused_kernel(bits: int, group_size: int) -> bool:
    """Whether ORT's MatMulNBits / GatherBlockQuantized take this format directly."""
    pow2 = group_size >= 16 and group_size & (group_size - 1) == 0
    return bits in (4, 8) and pow2 or (bits == 2 and pow2 and group_size <= 256)


def _zero_codes(zeros, n_rows: int, groups: int, bits: int):
    """Zero points as uint8 codes ``[rows, groups]`` (symmetric: ``2**(bits-1)``)."""
    if zeros is None:
        return const(np.full((n_rows, groups), 1 << (bits - 1), np.uint8))
    return unpack(zeros, groups, bits)


def qlinear(x, qweight, scales, zeros, bias, bits: int, group_size: int):
    n, groups = qweight.shape[0], qweight.shape[1]
    k = groups * group_size
    if has_fused_kernel(bits, group_size):
        return MatMulNBits(x, qweight, scales, zeros, None, bias, K=k, N=n, bits=bits, block_size=group_size)
    codes = op.Reshape(unpack(qweight, group_size, bits), const(np.array([n, k], np.int64)))
    zero = _zero_codes(zeros, n, groups, bits)
    w = op.DequantizeLinear(op.Transpose(codes, perm=[1, 0]), op.Transpose(scales, perm=[1, 0]),
                            op.Transpose(zero, perm=[1, 0]), axis=0, block_size=group_size)
    y = op.MatMul(x, w)
    return y if bias is None else op.Add(y, bias)


def qembedding(indices, qweight, scales, zeros, bits: int, group_size: int):
    rows, groups = qweight.shape[0], qweight.shape[1]
    dim = groups * group_size
    out_shape = op.Concat(op.Shape(indices), const(np.array([dim], np.int64)), axis=0)
    if has_fused_kernel(bits, group_size):
        zero3 = None if zeros is None else op.Unsqueeze(unpack(zeros, groups, bits), const(np.array([-1], np.int64)))
        rows3 = GatherBlockQuantized(qweight, indices, op.Unsqueeze(scales, const(np.array([-1], np.int64))), zero3,
                                     gather_axis=0, quantize_axis=2, block_size=group_size, bits=bits)
        return op.Reshape(rows3, out_shape)
    codes = op.Reshape(unpack(qweight, group_size, bits), const(np.array([rows, dim], np.int64)))
    zero = _zero_codes(zeros, rows, groups, bits)
    picked = [op.Gather(t, indices, axis=0) for t in (codes, scales, zero)]
    return op.DequantizeLinear(*picked, axis=-1, block_size=group_size)


def fake_quant_linear(x, weight, scales, zeros, bias, bits: int, group_size: int):
    """QAT's layer exports as its dequantized float weight: ``fq(W)`` computed from the
    initializers in standard ops (ORT folds it at load), then ``MatMul``."""
    n, k = weight.shape[0], weight.shape[1]
    groups = k // group_size
    w = op.Reshape(weight, const(np.array([n, groups, group_size], np.int64)))
    s = op.Unsqueeze(scales, const(np.array([-1], np.int64)))
    z = op.Unsqueeze(op.CastLike(_zero_codes(zeros, n, groups, bits), s), const(np.array([-1], np.int64)))
    codes = op.Clip(op.Add(op.Round(op.Div(op.CastLike(w, s), s)), z),
                    op.CastLike(const(np.array(0, np.float32)), s),
                    op.CastLike(const(np.array((1 << bits) - 1, np.float32)), s))
    wq = op.CastLike(op.Reshape(op.Mul(op.Sub(codes, z), s), const(np.array([n, k], np.int64))), x)
    y = op.MatMul(x, op.Transpose(wq, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def lut_linear(x, qweight, lut, scales, bias, bits: int, group_size: int):
    """Unpack the indices -> ``GatherElements`` on the table -> (× scales) -> ``MatMul``. Every op
    before the MatMul reads initializers only, so ORT folds the dequantized ``[K, N]`` weight at
    load (the file stays packed; memory holds the float weight; see docs/nonuniform.md)."""
    n, groups, lut_groups = qweight.shape[0], qweight.shape[1], lut.shape[1]
    k = groups * group_size
    idx = op.Reshape(unpack(qweight, group_size, bits), const(np.array([n, lut_groups, k // lut_groups], np.int64)))
    w = op.GatherElements(lut, op.Cast(idx, to=onnx.TensorProto.INT64), axis=2)
    if scales is not None:
        w = op.Mul(op.Reshape(w, const(np.array([n, groups, group_size], np.int64))),
                   op.Unsqueeze(scales, const(np.array([-1], np.int64))))
    w = op.Transpose(op.Reshape(w, const(np.array([n, k], np.int64))), perm=[1, 0])
    y = op.MatMul(x, op.CastLike(w, x))
    return y if bias is None else op.Add(y, bias)


def w8a8_linear(x, qweight, w_scale, bias):
    """Per-token int8 activations in standard ops (``ReduceMax(|x|)/127``, ``Round(x/s)``, cast to
    int8 with no zero point), then ORT's ``com.microsoft::MatMulIntegerToFloat`` (int32 GEMM scaled
    by the weight scales, ``a_scale = 1``) and ``Mul`` by the token scales: the reference arithmetic
    of ``quant/w8a8.py`` exactly, on every CPU. (The uint8 form with zero point 128 is not: on CPUs
    without VNNI, MLAS's u8 x s8 kernel adds product pairs in saturating int16, ``vpmaddubsw``,
    and full-range codes overflow; the s8 x s8 kernel does not.)
    ``MatMulIntegerToFloat`` takes only per-tensor/per-column activation scales, hence the Mul;
    ``DynamicQuantizeMatMul`` (``quantize_dynamic``'s fused form) is per-tensor and measured slower."""
    amax = op.ReduceMax(op.Abs(x), const(np.array([-1], np.int64)), keepdims=1)
    s = op.Max(op.Div(amax, const(np.array(127, np.float32))), const(np.array(1e-12, np.float32)))
    q = op.Cast(op.Round(op.Div(x, s)), to=onnx.TensorProto.INT8)
    y = MatMulIntegerToFloat(q, op.Transpose(qweight, perm=[1, 0]), const(np.array(1, np.float32)), w_scale)
    y = op.Mul(y, s)
    return y if bias is None else op.Add(y, bias)
