"""ONNX translations of the pruning ops (onnxscript). ``channel_gate``: the gate vector is computed
from its initializer (ORT folds it at load) and broadcast along the gated axis. ``bip_weight``: the
mask from ``TopK`` of the scores (ORT folds it too)."""
from __future__ import annotations

import numpy as np
from onnxscript import opset21 as op

from splice.kernels._onnx import const
from splice.kernels.prune.gate_math import GATE_HIGH, GATE_LOW


def channel_gate(x, log_alpha, dim: int, keep: float, penalty: float):
    gate = op.Clip(op.Add(op.Mul(op.Sigmoid(log_alpha), const(np.array(GATE_HIGH - GATE_LOW, np.float32))),
                          const(np.array(GATE_LOW, np.float32))),
                   const(np.array(0.0, np.float32)), const(np.array(1.0, np.float32)))
    rank = len(x.shape) if x.shape is not None else None
    axis = dim % rank if rank else dim
    shape = [1] * rank
    shape[axis] = -1
    return op.Mul(x, op.CastLike(op.Reshape(gate, const(np.array(shape, np.int64))), x))


def predicted_topk(act, x, down, up, k: int):
    """Scores by two MatMuls, ``TopK`` indices, a 0/1 mask by ``ScatterElements``, then ``Mul``."""
    scores = op.MatMul(op.MatMul(op.CastLike(x, down), op.Transpose(down, perm=[1, 0])), op.Transpose(up, perm=[1, 0]))
    _, idx = op.TopK(scores, const(np.array([k], np.int64)), axis=-1)
    zeros = op.Expand(op.CastLike(const(np.array(0.0, np.float32)), act), op.Shape(scores))
    ones = op.Expand(op.CastLike(const(np.array(1.0, np.float32)), act), op.Shape(idx))
    return op.Mul(act, op.ScatterElements(zeros, idx, ones, axis=-1))


def bip_weight(weight, scores, sparsity: float, gamma: float, mask_lr: float):
    """Drop the ``k`` lowest scores (``TopK`` smallest: ties lower index first, as the op), mask, ``Mul``."""
    numel = int(np.prod(scores.shape))
    k = int(sparsity * numel)
    if not k:
        return weight
    flat = op.Reshape(scores, const(np.array([-1], np.int64)))
    _, idx = op.TopK(flat, const(np.array([k], np.int64)), axis=0, largest=0)
    keep = op.ScatterElements(op.Expand(const(np.array(1.0, np.float32)), op.Shape(flat)), idx,
                              op.Expand(const(np.array(0.0, np.float32)), op.Shape(idx)), axis=0)
    return op.Mul(weight, op.CastLike(op.Reshape(keep, op.Shape(weight)), weight))
