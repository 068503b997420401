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
MatMulIntegerToFloat = contrib_op("MatMulIntegerToFloat", ["A", "B", "a_scale", "b_scale", "a_zero_point?",
                                                          "b_zero_point?", "bias?"], {})


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
    k = x.shape[-1]  # from x and -1 below, not from A and B: they may be computed (NOLA, SVFit, SORSA)
    flat = op.CastLike(op.Reshape(x, _const(np.array([-1, k], np.int64))), A)  # A, B, scale: one dtype
    h = op.Mul(op.Gemm(flat, A, transB=1), scale)
    y = op.CastLike(op.Gemm(h, B, transB=1), x)
    return op.Reshape(y, op.Concat(op.Shape(x, end=-1), _const(np.array([-1], np.int64)), axis=0))


def folded_adapter(base, tensors, spec: str):
    """Nothing reads a fold record; export keeps a constant that the optimizer removes."""
    return op.Constant(value_float=0.0)


TRANSLATIONS[torch.ops.splice.lora_delta.default] = lora_delta
TRANSLATIONS[torch.ops.splice.folded_adapter.default] = folded_adapter


def fake_quant_linear(x, weight, scales, zeros, bias, bits: int, group_size: int):
    """QAT's layer exports as its dequantized float weight: ``fq(W)`` computed from the
    initializers in standard ops (ORT folds it at load), then ``MatMul``."""
    n, k = weight.shape[0], weight.shape[1]
    groups = k // group_size
    w = op.Reshape(weight, _const(np.array([n, groups, group_size], np.int64)))
    s = op.Unsqueeze(scales, _const(np.array([-1], np.int64)))
    z = op.Unsqueeze(op.CastLike(_zero_codes(zeros, n, groups, bits), s), _const(np.array([-1], np.int64)))
    codes = op.Clip(op.Add(op.Round(op.Div(op.CastLike(w, s), s)), z),
                    op.CastLike(_const(np.array(0, np.float32)), s),
                    op.CastLike(_const(np.array((1 << bits) - 1, np.float32)), s))
    wq = op.CastLike(op.Reshape(op.Mul(op.Sub(codes, z), s), _const(np.array([n, k], np.int64))), x)
    y = op.MatMul(x, op.Transpose(wq, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


TRANSLATIONS[torch.ops.splice.fake_quant_linear.default] = fake_quant_linear


def lut_linear(x, qweight, lut, scales, bias, bits: int, group_size: int):
    """Unpack the indices -> ``GatherElements`` on the table -> (× scales) -> ``MatMul``. Every op
    before the MatMul reads initializers only, so ORT folds the dequantized ``[K, N]`` weight at
    load (the file stays packed; memory holds the float weight; see docs/nonuniform.md)."""
    n, groups, lut_groups = qweight.shape[0], qweight.shape[1], lut.shape[1]
    k = groups * group_size
    idx = op.Reshape(unpack(qweight, group_size, bits), _const(np.array([n, lut_groups, k // lut_groups], np.int64)))
    w = op.GatherElements(lut, op.Cast(idx, to=onnx.TensorProto.INT64), axis=2)
    if scales is not None:
        w = op.Mul(op.Reshape(w, _const(np.array([n, groups, group_size], np.int64))),
                   op.Unsqueeze(scales, _const(np.array([-1], np.int64))))
    w = op.Transpose(op.Reshape(w, _const(np.array([n, k], np.int64))), perm=[1, 0])
    y = op.MatMul(x, op.CastLike(w, x))
    return y if bias is None else op.Add(y, bias)


TRANSLATIONS[torch.ops.splice.lut_linear.default] = lut_linear


def _chosen(mask):
    """Indices of a 1-D bool mask's True entries (int64 ``[k]``); ORT folds it (an initializer)."""
    return op.Reshape(op.NonZero(mask), _const(np.array([-1], np.int64)))


def _as_2d(x, k: int, like):
    return op.CastLike(op.Reshape(x, _const(np.array([-1, k], np.int64))), like)


def _as_nd(y, x, n: int):
    return op.Reshape(op.CastLike(y, x), op.Concat(op.Shape(x, end=-1), _const(np.array([n], np.int64)), axis=0))


def sparse_delta(x, values, mask, scale):
    """``ScatterND`` of the values into a zero ``[out, in]`` at ``NonZero(mask)`` (initializers only:
    ORT folds the dense ΔW at load, the file keeps values + mask), then ``Gemm``."""
    out_f, in_f = mask.shape
    dw = op.ScatterND(op.CastLike(op.ConstantOfShape(op.Shape(mask)), values),
                      op.Transpose(op.NonZero(mask), perm=[1, 0]), values)
    return _as_nd(op.Mul(op.Gemm(_as_2d(x, in_f, values), dw, transB=1), scale), x, out_f)


def row_delta(x, values, mask, scale):
    """``Gemm`` on the k chosen rows only, then ``ScatterND`` of the k outputs into ``out`` columns."""
    out_f, in_f = mask.shape[0], values.shape[1]
    h = op.Mul(op.Gemm(_as_2d(x, in_f, values), values, transB=1), scale)                # [N, k]
    zeros = op.ConstantOfShape(op.Concat(op.Shape(mask), op.Shape(h, start=0, end=1), axis=0))
    placed = op.ScatterND(op.CastLike(zeros, h), op.Unsqueeze(_chosen(mask), _const(np.array([1], np.int64))),
                          op.Transpose(h, perm=[1, 0]))                                    # [out, N]
    return _as_nd(op.Transpose(placed, perm=[1, 0]), x, out_f)


def col_delta(x, values, mask, scale):
    """``Gather`` of the k chosen input features, then ``Gemm`` with values ``[out, k]``."""
    in_f, out_f = mask.shape[0], values.shape[0]
    picked = op.Gather(_as_2d(x, in_f, values), _chosen(mask), axis=1)
    return _as_nd(op.Mul(op.Gemm(picked, values, transB=1), scale), x, out_f)


def dsee_delta(x, A, B, values, mask, scale):
    return op.Add(lora_delta(x, A, B, scale), sparse_delta(x, values, mask, scale))


for _name, _fn in (("sparse_delta", sparse_delta), ("row_delta", row_delta), ("col_delta", col_delta),
                   ("dsee_delta", dsee_delta)):
    TRANSLATIONS[getattr(torch.ops.splice, _name).default] = _fn


# ---------------------------------------------------------- factored adapter deltas
# The factors are initializers, so ORT folds each dense update (Einsum, Mul) at session load and
# the runtime cost is LoRA's two Gemms (NOLA, SVFit, SORSA) or one Conv / MatMul (FLoRA, TeRA).
_TUCKER4 = "abcd,ia,jb,kc,ld->ijkl"


def nola_delta(x, coef_a, coef_b, basis_a, basis_b, scale):
    a = op.Einsum(coef_a, basis_a, equation="k,kri->ri")
    b = op.Einsum(coef_b, basis_b, equation="k,kor->or")
    return lora_delta(x, a, b, scale)


def svd_delta(x, U, S, Vh, scale):
    return lora_delta(x, op.Mul(Vh, op.Unsqueeze(S, _const(np.array([-1], np.int64)))), U, scale)


def flora_conv2d_delta(x, core, u_out, u_in, u_h, u_w, scale, stride, padding, dilation, groups: int):
    w = op.Mul(op.Einsum(core, u_out, u_in, u_h, u_w, equation=_TUCKER4), scale)
    y = op.Conv(op.CastLike(x, w), w, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
                group=groups)
    return op.CastLike(y, x)


def tera_delta(x, lam, core, f1, f2, f3, f4, scale):
    scaled, start = [], 0
    for f in (f1, f2, f3, f4):
        width = f.shape[1]
        piece = op.Slice(lam, _const(np.array([start], np.int64)), _const(np.array([start + width], np.int64)))
        scaled.append(op.Mul(f, piece))
        start += width
    out_f, in_f = f1.shape[0] * f2.shape[0], f3.shape[0] * f4.shape[0]
    w = op.Reshape(op.Einsum(core, *scaled, equation=_TUCKER4), _const(np.array([out_f, in_f], np.int64)))
    y = op.Mul(op.MatMul(op.CastLike(x, w), op.Transpose(w, perm=[1, 0])), scale)
    return op.CastLike(y, x)


TRANSLATIONS[torch.ops.splice.nola_delta.default] = nola_delta
TRANSLATIONS[torch.ops.splice.svfit_delta.default] = svd_delta
TRANSLATIONS[torch.ops.splice.sorsa_delta.default] = svd_delta
TRANSLATIONS[torch.ops.splice.flora_conv2d_delta.default] = flora_conv2d_delta
TRANSLATIONS[torch.ops.splice.tera_delta.default] = tera_delta


def w8a8_linear(x, qweight, w_scale, bias):
    """Per-token int8 activations in standard ops (``ReduceMax(|x|)/127``, ``Round(x/s)``, shifted to
    uint8 with zero point 128, the form MLAS's u8s8 GEMM takes), then ORT's
    ``com.microsoft::MatMulIntegerToFloat`` (int32 GEMM scaled by the weight scales, ``a_scale = 1``)
    and ``Mul`` by the token scales: the reference arithmetic of ``kernels/w8a8.py`` exactly.
    ``MatMulIntegerToFloat`` takes only per-tensor/per-column activation scales, hence the Mul;
    ``DynamicQuantizeMatMul`` (``quantize_dynamic``'s fused form) is per-tensor and measured slower."""
    amax = op.ReduceMax(op.Abs(x), _const(np.array([-1], np.int64)), keepdims=1)
    s = op.Max(op.Div(amax, _const(np.array(127, np.float32))), _const(np.array(1e-12, np.float32)))
    q = op.Cast(op.Add(op.Round(op.Div(x, s)), _const(np.array(128, np.float32))), to=onnx.TensorProto.UINT8)
    y = MatMulIntegerToFloat(q, op.Transpose(qweight, perm=[1, 0]), _const(np.array(1, np.float32)), w_scale,
                             _const(np.array(128, np.uint8)))
    y = op.Mul(y, s)
    return y if bias is None else op.Add(y, bias)


TRANSLATIONS[torch.ops.splice.w8a8_linear.default] = w8a8_linear


# ------------------------------------------------------ vera / bone / adalora deltas
# Slices, tiles and the Bat update read initializers only: ORT folds them at session load.


def _int64(*values):
    return _const(np.array(values, np.int64))


def vera_delta(x, lambda_d, lambda_b, vera_A, vera_B, scale):
    """The shared ``vera_A``/``vera_B`` initializers ``Slice``d to the layer, two ``Gemm``s, the
    λ ``Mul``s (the pair stays one initializer each, whatever the number of layers)."""
    in_f, out_f = x.shape[-1], lambda_b.shape[0]
    a = op.Slice(vera_A, _int64(0), _int64(in_f), _int64(1))
    b = op.Slice(vera_B, _int64(0), _int64(out_f), _int64(0))
    h = op.Mul(op.Gemm(_as_2d(x, in_f, a), a, transB=1), lambda_d)
    return _as_nd(op.Mul(op.Mul(op.Gemm(h, b, transB=1), lambda_b), scale), x, out_f)


def bone_delta(x, block, scale):
    """``Pad`` to a multiple of r, ``Reshape`` to r-wide blocks, ``ReduceSum``, ``Gemm`` with the block."""
    return _bone(x, block, scale, *block.shape)


def bone_mini_delta(x, y, block, scale):
    """``bone_delta`` with the block ``Tile``d along the output to ``y``'s width."""
    (r, mini_r), out_f = block.shape, y.shape[-1]
    return _bone(x, op.Tile(block, _int64(1, out_f // mini_r)), scale, r, out_f)


def _bone(x, block, scale, r, out_f):
    in_f = x.shape[-1]
    flat = _as_2d(x, in_f, block)
    if in_f % r:
        flat = op.Pad(flat, _int64(0, 0, 0, r - in_f % r))
    summed = op.ReduceSum(op.Reshape(flat, _int64(-1, -(-in_f // r), r)), _int64(1), keepdims=0)
    return _as_nd(op.Mul(op.Gemm(summed, block), scale), x, out_f)


def adalora_delta(x, A, E, B, scale, ranknum):
    return lora_delta(x, op.Mul(A, E), B, op.Div(scale, ranknum))


TRANSLATIONS[torch.ops.splice.vera_delta.default] = vera_delta
TRANSLATIONS[torch.ops.splice.bone_delta.default] = bone_delta
TRANSLATIONS[torch.ops.splice.bone_mini_delta.default] = bone_mini_delta
TRANSLATIONS[torch.ops.splice.adalora_delta.default] = adalora_delta


# ------------------------------ adapter ops that read the base layer (DoRA, SSF; IA3, Bat recompute it)


def _minus_one(v):
    return op.Sub(v, op.CastLike(_const(np.array(1, np.float32)), v))


def dora_delta(x, y, weight, bias, A, B, magnitude, lora_scale, scale):
    """``ReduceL2`` of ``W + s·B A`` per row (initializers only: ORT folds the norm at load), the
    LoRA ``Gemm`` pair, and the per-channel ratio ``m / ‖·‖`` on ``y - b`` and the LoRA output."""
    w = op.Add(op.CastLike(weight, A), op.Mul(op.MatMul(B, A), lora_scale))
    ratio = op.Div(magnitude, op.ReduceL2(w, _int64(1), keepdims=0))
    base = op.CastLike(y if bias is None else op.Sub(y, bias), A)
    lora = op.CastLike(lora_delta(x, A, B, lora_scale), A)
    return op.CastLike(op.Mul(op.Add(op.Mul(_minus_one(ratio), base), op.Mul(ratio, lora)), scale), y)


def _mix(v, scale):
    """``v·s + 1 - s`` (kernels/base_deltas.py ``mix``)."""
    s = op.CastLike(scale, v)
    return op.Add(op.Mul(v, s), op.Sub(op.CastLike(_const(np.array(1, np.float32)), v), s))


def _linear(x, weight, bias, shape):
    """``x Wᵀ + b`` on ``x`` flattened to 2-D (``Gemm``), back to ``x``'s leading shape; ``shape``
    is the stored weight's ``(out, in)`` (a computed weight has none)."""
    out_f, in_f = shape
    flat = _as_2d(x, in_f, weight)
    y = op.Gemm(flat, weight, transB=1) if bias is None else op.Gemm(flat, weight, op.CastLike(bias, weight), transB=1)
    return _as_nd(y, x, out_f)


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
    blocks = op.Transpose(op.Reshape(w, _int64(out_f // r, r, in_f // r, r)), perm=[2, 0, 1, 3])
    dw = op.Reshape(op.Transpose(op.Add(op.MatMul(blocks, block), block), perm=[1, 2, 0, 3]), _int64(out_f, in_f))
    return _linear(x, op.Add(w, op.Mul(dw, scale)), bias, weight.shape)


def ssf_delta(y, gamma, beta, scale):
    return op.CastLike(op.Mul(op.Add(op.Mul(_minus_one(gamma), op.CastLike(y, gamma)), beta), scale), y)


TRANSLATIONS[torch.ops.splice.dora_delta.default] = dora_delta
TRANSLATIONS[torch.ops.splice.ssf_delta.default] = ssf_delta
TRANSLATIONS[torch.ops.splice.ia3_scale.default] = ia3_scale
TRANSLATIONS[torch.ops.splice.ia3_ff_linear.default] = ia3_ff_linear
TRANSLATIONS[torch.ops.splice.bat_linear.default] = bat_linear
