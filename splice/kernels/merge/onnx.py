"""ONNX translation of ``splice::basis_weight``: ``Gather`` the task's coefficients, contract them
with the basis (``MatMul`` over the flattened basis), ``Reshape`` and ``Add`` the base; every input
is an initializer, so ONNX Runtime folds the weight at load."""
from __future__ import annotations

import numpy as np
from onnxscript import opset21 as op

from splice.kernels._onnx import const


def basis_weight(base, basis, coefficients, task):
    mix = op.Unsqueeze(op.Gather(coefficients, task, axis=0), const(np.array([0], np.int64)))  # [1, k]
    flat = op.Reshape(basis, op.Concat(op.Shape(basis, start=0, end=1), const(np.array([-1], np.int64)), axis=0))
    return op.Add(base, op.CastLike(op.Reshape(op.MatMul(op.CastLike(mix, flat), flat), op.Shape(base)), base))
