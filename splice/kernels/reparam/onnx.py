"""ONNX translation of ``splice::bcq_linear`` (onnxscript), declared in its registry record and
imported only when the ONNX exporter asks.

The file keeps the weights packed: the uint8 codes ``[bits, N, K/8]`` (1 bit per sign) and the
scales are the initializers. In the graph, standard ops unpack them — ``Gather`` of each byte,
``BitShift`` right by the bit position, ``BitwiseAnd 1`` (``kernels/_onnx.py``'s ``unpack``) — map
bits to ±1, multiply by the scales broadcast over each group, sum the bit-planes and ``MatMul``.
Every op before the MatMul reads initializers only, so ONNX Runtime folds the dense float
``[K, N]`` weight at session creation: the file is ``bits/32`` of the float size plus scales,
memory at run time holds the float weight and the matmul runs at float speed (docs/reparam.md).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnxscript import opset21 as op

from splice.kernels._onnx import const, unpack


def bcq_linear(x, codes, scales, bias, group_size: int):
    bits, n, width = codes.shape[0], codes.shape[1], codes.shape[2]
    k = width * 8
    groups = k // group_size
    planes = op.Cast(unpack(codes, k, 1), to=onnx.TensorProto.FLOAT)               # [bits, N, K] of 0/1
    signs = op.Sub(op.Mul(planes, const(np.array(2, np.float32))), const(np.array(1, np.float32)))
    signs = op.Reshape(signs, const(np.array([bits, n, groups, group_size], np.int64)))
    alpha = op.Unsqueeze(op.Cast(scales, to=onnx.TensorProto.FLOAT), const(np.array([-1], np.int64)))
    w = op.ReduceSum(op.Mul(signs, alpha),
                     const(np.array([0], np.int64)), keepdims=0)                    # [N, G, gs]
    w = op.Transpose(op.Reshape(w, const(np.array([n, k], np.int64))), perm=[1, 0])
    # a Cast to x's type, not CastLike: ORT's constant folding takes Cast (the weight is folded at load)
    y = op.MatMul(x, op.CastLike(w, x) if x.dtype is None else op.Cast(w, to=int(x.dtype)))
    return y if bias is None else op.Add(y, bias)
