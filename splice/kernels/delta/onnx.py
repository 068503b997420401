"""ONNX translations of the delta ops (onnxscript): the payload decoded with standard ONNX ops
(bit unpacking by shifts, or ``_onnx.unpack`` for wider codes; every op reads initializers only, so ONNX Runtime folds the
decode at load) and added to the base weight, in float32, cast back to the base's dtype."""
from __future__ import annotations

import numpy as np
import onnx
from onnxscript import opset21 as op

from splice.kernels._onnx import const, int64, unpack

_F = onnx.TensorProto.FLOAT


def _rows_cols(base) -> tuple[int, int]:
    shape = [int(d) for d in base.shape]
    rows = shape[0] if len(shape) > 1 else 1
    return rows, int(np.prod(shape)) // rows


def _add(base, delta):
    """``base + delta`` with ``delta`` reshaped to the base's shape, in the base's dtype."""
    return op.CastLike(op.Add(op.Cast(base, to=_F), op.Reshape(delta, op.Shape(base))), base)


def _sign(bits):
    """0/1 codes -> -1/+1 floats."""
    return op.Sub(op.Mul(op.Cast(bits, to=_F), const(np.array(2.0, np.float32))), const(np.array(1.0, np.float32)))


def _bits(packed, n: int):
    """1-bit codes (least significant bit first) of uint8 ``packed [..., W]`` as uint8 ``[..., n]``:
    eight shifts per byte, so the constants stay eight long whatever the tensor's size."""
    shifts = const(np.arange(8, dtype=np.uint8))
    bits = op.BitwiseAnd(op.BitShift(op.Unsqueeze(packed, int64(-1)), shifts, direction="RIGHT"),
                         const(np.array(1, np.uint8)))
    lead = op.Shape(packed, end=-1)
    flat = op.Reshape(bits, op.Concat(lead, int64(-1), axis=0))
    return op.Slice(flat, int64(0), int64(n), int64(-1))


def delta_dense(base, delta, scale):
    return _add(base, op.Mul(op.Cast(delta, to=_F), op.Cast(scale, to=_F)))


def delta_ternary(base, mask, signs, scale):
    """The kept weights' signs sit in row-major order: weight ``i`` reads sign ``cumsum(mask)[i] − 1``."""
    rows, cols = _rows_cols(base)
    n = rows * cols
    keep = op.Cast(_bits(mask, n), to=onnx.TensorProto.INT64)
    sign = _sign(_bits(signs, int(signs.shape[0]) * 8))
    index = op.Max(op.Sub(op.CumSum(keep, int64(0)), int64(1)), int64(0))
    values = op.Mul(op.Gather(sign, index, axis=0), op.Cast(keep, to=_F))
    return _add(base, op.Mul(values, op.Cast(scale, to=_F)))


def delta_signs(base, signs, u, v):
    _, cols = _rows_cols(base)
    s = _sign(_bits(signs, cols))  # [k, rows, cols]
    mag = op.Mul(op.Unsqueeze(op.Cast(u, to=_F), int64(2)), op.Unsqueeze(op.Cast(v, to=_F), int64(1)))
    return _add(base, op.ReduceSum(op.Mul(s, mag), int64(0), keepdims=0))


def delta_lowrank(base, A, B, scale):
    return _add(base, op.Mul(op.MatMul(op.Cast(B, to=_F), op.Cast(A, to=_F)), op.Cast(scale, to=_F)))


def delta_quant(base, codes, scales, bits: int):
    _, cols = _rows_cols(base)
    q = op.Sub(op.Cast(unpack(codes, cols, bits), to=_F), const(np.array(float(1 << (bits - 1)), np.float32)))
    return _add(base, op.Mul(q, op.Unsqueeze(op.Cast(scales, to=_F), int64(1))))
