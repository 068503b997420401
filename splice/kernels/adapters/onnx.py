"""ONNX translations of the adapter ops (onnxscript), declared in their registry records
(``adapters/*_ops.py``) and imported only when the ONNX exporter asks. Adapter tensors stay
initializers under their stored names; every dense update they imply reads initializers only,
so ORT folds it at session load.
"""
from __future__ import annotations

import numpy as np
from onnxscript import opset21 as op

from splice.kernels._onnx import as_2d, as_nd, const, int64

def lora_delta(x, A, B, scale):
    """``Gemm(Gemm(x₂, A, transB) · scale, B, transB)`` on ``x`` flattened to 2-D: A and B stay
    initializers under their stored names, in PEFT layout (no transposes for the optimizer to fold)."""
    k = x.shape[-1]  # from x and -1 below, not from A and B: they may be computed (NOLA, SVFit, SORSA)
    flat = op.CastLike(op.Reshape(x, const(np.array([-1, k], np.int64))), A)  # A, B, scale: one dtype
    h = op.Mul(op.Gemm(flat, A, transB=1), scale)
    y = op.CastLike(op.Gemm(h, B, transB=1), x)
    return op.Reshape(y, op.Concat(op.Shape(x, end=-1), const(np.array([-1], np.int64)), axis=0))


def folded_adapter(base, tensors, spec: str):
    """Nothing reads a fold record; export keeps a constant that the optimizer removes."""
    return op.Constant(value_float=0.0)

def _chosen(mask):
    """Indices of a 1-D bool mask's True entries (int64 ``[k]``); ORT folds it (an initializer)."""
    return op.Reshape(op.NonZero(mask), const(np.array([-1], np.int64)))

def sparse_delta(x, values, mask, scale):
    """``ScatterND`` of the values into a zero ``[out, in]`` at ``NonZero(mask)`` (initializers only:
    ORT folds the dense ΔW at load, the file keeps values + mask), then ``Gemm``."""
    out_f, in_f = mask.shape
    dw = op.ScatterND(op.CastLike(op.ConstantOfShape(op.Shape(mask)), values),
                      op.Transpose(op.NonZero(mask), perm=[1, 0]), values)
    return as_nd(op.Mul(op.Gemm(as_2d(x, in_f, values), dw, transB=1), scale), x, out_f)


def row_delta(x, values, mask, scale):
    """``Gemm`` on the k chosen rows only, then ``ScatterND`` of the k outputs into ``out`` columns."""
    out_f, in_f = mask.shape[0], values.shape[1]
    h = op.Mul(op.Gemm(as_2d(x, in_f, values), values, transB=1), scale)                # [N, k]
    zeros = op.ConstantOfShape(op.Concat(op.Shape(mask), op.Shape(h, start=0, end=1), axis=0))
    placed = op.ScatterND(op.CastLike(zeros, h), op.Unsqueeze(_chosen(mask), const(np.array([1], np.int64))),
                          op.Transpose(h, perm=[1, 0]))                                    # [out, N]
    return as_nd(op.Transpose(placed, perm=[1, 0]), x, out_f)


def col_delta(x, values, mask, scale):
    """``Gather`` of the k chosen input features, then ``Gemm`` with values ``[out, k]``."""
    in_f, out_f = mask.shape[0], values.shape[0]
    picked = op.Gather(as_2d(x, in_f, values), _chosen(mask), axis=1)
    return as_nd(op.Mul(op.Gemm(picked, values, transB=1), scale), x, out_f)


def dsee_delta(x, A, B, values, mask, scale):
    return op.Add(lora_delta(x, A, B, scale), sparse_delta(x, values, mask, scale))

# ---------------------------------------------------------- factored adapter deltas
# The factors are initializers, so ORT folds each dense update (Einsum, Mul) at session load and
# the runtime cost is LoRA's two Gemms (NOLA, SVFit, SORSA) or one Conv / MatMul (FLoRA, TeRA).
_TUCKER4 = "abcd,ia,jb,kc,ld->ijkl"


def nola_delta(x, coef_a, coef_b, basis_a, basis_b, scale):
    a = op.Einsum(coef_a, basis_a, equation="k,kri->ri")
    b = op.Einsum(coef_b, basis_b, equation="k,kor->or")
    return lora_delta(x, a, b, scale)


def svd_delta(x, U, S, Vh, scale):
    return lora_delta(x, op.Mul(Vh, op.Unsqueeze(S, const(np.array([-1], np.int64)))), U, scale)


def flora_conv2d_delta(x, core, u_out, u_in, u_h, u_w, scale, stride, padding, dilation, groups: int):
    w = op.Mul(op.Einsum(core, u_out, u_in, u_h, u_w, equation=_TUCKER4), scale)
    y = op.Conv(op.CastLike(x, w), w, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
                group=groups)
    return op.CastLike(y, x)


def tera_delta(x, lam, core, f1, f2, f3, f4, scale):
    scaled, start = [], 0
    for f in (f1, f2, f3, f4):
        width = f.shape[1]
        piece = op.Slice(lam, const(np.array([start], np.int64)), const(np.array([start + width], np.int64)))
        scaled.append(op.Mul(f, piece))
        start += width
    out_f, in_f = f1.shape[0] * f2.shape[0], f3.shape[0] * f4.shape[0]
    w = op.Reshape(op.Einsum(core, *scaled, equation=_TUCKER4), const(np.array([out_f, in_f], np.int64)))
    y = op.Mul(op.MatMul(op.CastLike(x, w), op.Transpose(w, perm=[1, 0])), scale)
    return op.CastLike(y, x)

# ------------------------------------------------------ vera / bone / adalora deltas
# Slices, tiles and the Bat update read initializers only: ORT folds them at session load.

def vera_delta(x, lambda_d, lambda_b, vera_A, vera_B, scale):
    """The shared ``vera_A``/``vera_B`` initializers ``Slice``d to the layer, two ``Gemm``s, the
    λ ``Mul``s (the pair stays one initializer each, whatever the number of layers)."""
    in_f, out_f = x.shape[-1], lambda_b.shape[0]
    a = op.Slice(vera_A, int64(0), int64(in_f), int64(1))
    b = op.Slice(vera_B, int64(0), int64(out_f), int64(0))
    h = op.Mul(op.Gemm(as_2d(x, in_f, a), a, transB=1), lambda_d)
    return as_nd(op.Mul(op.Mul(op.Gemm(h, b, transB=1), lambda_b), scale), x, out_f)


def bone_delta(x, block, scale):
    """``Pad`` to a multiple of r, ``Reshape`` to r-wide blocks, ``ReduceSum``, ``Gemm`` with the block."""
    return _bone(x, block, scale, *block.shape)


def bone_mini_delta(x, y, block, scale):
    """``bone_delta`` with the block ``Tile``d along the output to ``y``'s width."""
    (r, mini_r), out_f = block.shape, y.shape[-1]
    return _bone(x, op.Tile(block, int64(1, out_f // mini_r)), scale, r, out_f)


def _bone(x, block, scale, r, out_f):
    in_f = x.shape[-1]
    flat = as_2d(x, in_f, block)
    if in_f % r:
        flat = op.Pad(flat, int64(0, 0, 0, r - in_f % r))
    summed = op.ReduceSum(op.Reshape(flat, int64(-1, -(-in_f // r), r)), int64(1), keepdims=0)
    return as_nd(op.Mul(op.Gemm(summed, block), scale), x, out_f)


def adalora_delta(x, A, E, B, scale, ranknum):
    return lora_delta(x, op.Mul(A, E), B, op.Div(scale, ranknum))

# ------------------------------ adapter ops that read the base layer (DoRA, SSF; IA3, Bat recompute it)


def _minus_one(v):
    return op.Sub(v, op.CastLike(const(np.array(1, np.float32)), v))


def dora_delta(x, y, weight, bias, A, B, magnitude, lora_scale, scale):
    """``ReduceL2`` of ``W + s·B A`` per row (initializers only: ORT folds the norm at load), the
    LoRA ``Gemm`` pair, and the per-channel ratio ``m / ‖·‖`` on ``y - b`` and the LoRA output."""
    w = op.Add(op.CastLike(weight, A), op.Mul(op.MatMul(B, A), lora_scale))
    ratio = op.Div(magnitude, op.ReduceL2(w, int64(1), keepdims=0))
    base = op.CastLike(y if bias is None else op.Sub(y, bias), A)
    lora = op.CastLike(lora_delta(x, A, B, lora_scale), A)
    return op.CastLike(op.Mul(op.Add(op.Mul(_minus_one(ratio), base), op.Mul(ratio, lora)), scale), y)


def _mix(v, scale):
    """``v·s + 1 - s`` (kernels/base_deltas.py ``mix``)."""
    s = op.CastLike(scale, v)
    return op.Add(op.Mul(v, s), op.Sub(op.CastLike(const(np.array(1, np.float32)), v), s))


def _linear(x, weight, bias, shape):
    """``x Wᵀ + b`` on ``x`` flattened to 2-D (``Gemm``), back to ``x``'s leading shape; ``shape``
    is the stored weight's ``(out, in)`` (a computed weight has none)."""
    out_f, in_f = shape
    flat = as_2d(x, in_f, weight)
    y = op.Gemm(flat, weight, transB=1) if bias is None else op.Gemm(flat, weight, op.CastLike(bias, weight), transB=1)
    return as_nd(y, x, out_f)


def ia3_scale(y, l, scale):
    return op.CastLike(op.Mul(op.CastLike(y, l), _mix(l, scale)), y)


def ia3_ff_linear(y, x, weight, bias, l, scale):
    return _linear(op.CastLike(op.Mul(op.CastLike(x, l), _mix(l, scale)), x), weight, bias, weight.shape)


def bat_linear(y, x, weight, bias, block, scale):
    """Bat's ``W + ΔW``, ``ΔW_ij = W_ij B_i + B_i`` on r×r blocks of the weight initializer (ORT
    folds it at load), then one ``Gemm``: the base ``MatMul`` whose output ``y`` is unused is dead."""
    out_f, in_f = weight.shape
    r = block.shape[-1]
    w = op.CastLike(weight, block)
    blocks = op.Transpose(op.Reshape(w, int64(out_f // r, r, in_f // r, r)), perm=[2, 0, 1, 3])
    dw = op.Reshape(op.Transpose(op.Add(op.MatMul(blocks, block), block), perm=[1, 2, 0, 3]), int64(out_f, in_f))
    return _linear(x, op.Add(w, op.Mul(dw, scale)), bias, weight.shape)


def ssf_delta(y, gamma, beta, scale):
    return op.CastLike(op.Mul(op.Add(op.Mul(_minus_one(gamma), op.CastLike(y, gamma)), beta), scale), y)
