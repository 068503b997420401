"""ONNX translations of the low-rank ops (onnxscript), declared in their registry records
(``lowrank/ops.py``) and imported only when the ONNX exporter asks. Factors stay initializers under
their stored names; the rank-r path is two ``Gemm``s (never the dense product), and
``dense_sparse_linear``'s sparse factor is scattered from initializers only, so ORT folds it at load.
"""
from __future__ import annotations

import onnx
from onnxscript import opset21 as op

from splice.kernels._onnx import as_2d, as_nd


def _two_gemms(x, first, second, bias, in_f: int, out_f: int):
    h = op.Gemm(as_2d(x, in_f, second), first, transB=1)
    y = op.Gemm(h, second, transB=1) if bias is None else op.Gemm(h, second, op.CastLike(bias, second), transB=1)
    return as_nd(y, x, out_f)


def lowrank_linear(x, A, B, bias=None):
    """``Gemm(Gemm(x₂, A, transB), B, bias, transB)`` on ``x`` flattened to 2-D."""
    return _two_gemms(x, A, B, bias, A.shape[1], B.shape[0])


def dense_sparse_linear(x, D, values, index, bias=None):
    """``S = ScatterElements(0, index, values)`` (initializers only: folded at load), then two ``Gemm``s."""
    k, in_f = D.shape[1], values.shape[1]
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), values), op.Constant(value_ints=[k, in_f]))
    s = op.ScatterElements(zeros, op.Cast(index, to=onnx.TensorProto.INT64), values, axis=0)
    return _two_gemms(x, op.CastLike(s, D), D, bias, in_f, D.shape[0])


def lowrank_correction(y, x, A, B):
    """``y + Gemm(Gemm(x₂, A, transB), B, transB)``."""
    return op.Add(y, op.CastLike(_two_gemms(x, A, B, None, A.shape[1], B.shape[0]), y))
