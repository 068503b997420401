"""Every splice custom op: schema, reference implementation (plain torch, the ground
truth), fake implementation for torch.export, and autograd where the op can be trained.

Ops are the unit of lowering: each has an ONNX translation in ``kernels/onnx.py``.
Quantized weights are stored packed (see ``kernels/quant.py``), so byte counts are honest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.ir.graph import register_arg_roles
from splice.ir.select import register_kind
from splice.kernels import adapter_math, base_deltas
from splice.kernels.factored import autograd_by_recompute, nola_factors, tera_update, tucker4
from splice.kernels.fake_quant import fake_quantize, fake_quantize_for_backward
from splice.kernels.lut import lut_dequantize
from splice.kernels.quant import dequantize_packed
from splice.kernels.w8a8 import w8a8_matmul

# --------------------------------------------------------------------------- qlinear


@torch.library.custom_op("splice::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``y = x @ dequant(qweight).T + bias`` with group-wise packed weights.

    qweight: uint8 ``[N, K/group_size, group_size*bits/8]``; scales: ``[N, K/group_size]``;
    zeros: packed uint8 ``[N, ceil(G*bits/8)]`` or None for symmetric (zero = 2**(bits-1)).
    """
    w = dequantize_packed(qweight, scales, zeros, bits, group_size).to(x.dtype)
    return F.linear(x, w, bias)


def _check_storage(qweight, scales, bits, group_size):
    torch._check(qweight.dtype == torch.uint8 and qweight.dim() == 3, lambda: "qweight must be uint8 [N, G, blob]")
    torch._check(tuple(scales.shape) == tuple(qweight.shape[:2]), lambda: f"scales {tuple(scales.shape)} != {tuple(qweight.shape[:2])}")
    torch._check(qweight.shape[2] == (group_size * bits + 7) // 8, lambda: "qweight blob width does not match bits/group_size")


@qlinear.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size):
    _check_storage(qweight, scales, bits, group_size)
    torch._check(x.shape[-1] == qweight.shape[1] * group_size, lambda: "qlinear: input features != G * group_size")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def frozen_weight_autograd(op, weight) -> None:
    """Autograd for ``op(x, a, b, c, bias, bits, group_size) = x @ W(a, b, c)ᵀ + bias`` whose stored
    tensors do not train (packed low-bit weights): the gradient reaches ``x`` only, through
    ``W = weight(a, b, c, bits, group_size)`` rebuilt in the backward pass."""

    def setup(ctx, inputs, output):
        x, a, b, c, bias, bits, group_size = inputs
        ctx.save_for_backward(a, b, c)
        ctx.bits, ctx.group_size = bits, group_size

    def backward(ctx, grad):
        w = weight(*ctx.saved_tensors, ctx.bits, ctx.group_size).to(grad.dtype)
        return grad @ w, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup)


frozen_weight_autograd(qlinear, dequantize_packed)
register_kind(torch.ops.splice.qlinear.default, "linear")

# ------------------------------------------------------------------------ qembedding


@torch.library.custom_op("splice::qembedding", mutates_args=())
def qembedding(indices: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Embedding lookup on a table stored like ``qlinear``'s weight (``[V, D/g, g*bits/8]``):
    gathers the packed rows, then dequantizes only those."""
    q = qweight[indices.reshape(-1)]
    s = scales[indices.reshape(-1)]
    z = None if zeros is None else zeros[indices.reshape(-1)]
    rows = dequantize_packed(q, s, z, bits, group_size)
    return rows.reshape(*indices.shape, rows.shape[-1])


@qembedding.register_fake
def _(indices, qweight, scales, zeros, bits, group_size):
    _check_storage(qweight, scales, bits, group_size)
    return scales.new_empty(*indices.shape, qweight.shape[1] * group_size)


register_kind(torch.ops.splice.qembedding.default, "embedding")

register_arg_roles(torch.ops.splice.qlinear.default, {1: "qweight", 2: "scale", 3: "zero_point", 4: "bias"})
register_arg_roles(torch.ops.splice.qembedding.default, {1: "qweight", 2: "scale", 3: "zero_point"})

# -------------------------------------------------------------------------- observe


@torch.library.custom_op("splice::observe", mutates_args=())
def observe(x: torch.Tensor, key: str) -> torch.Tensor:
    """Identity that feeds ``x`` to the active calibration store (``kernels/observe.py``).
    Inserted by ``instrument.observe``; removed before export."""
    from splice.kernels.observe import record

    record(key, x)
    return x.clone()


@observe.register_fake
def _(x, key):
    return torch.empty_like(x)


observe.register_autograd(lambda ctx, grad: (grad, None))

# ----------------------------------------------------------------------- lora_delta


@torch.library.custom_op("splice::lora_delta", mutates_args=())
def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LoRA's update beside a base layer: ``(x @ Aᵀ · scale) @ Bᵀ`` (https://arxiv.org/abs/2106.09685).

    A: ``[r, in]``, B: ``[out, r]`` (PEFT's ``lora_A``/``lora_B`` weights), scale: a 0-d tensor, so
    an adapter's weight changes (or it is switched off with 0) without changing the graph.
    """
    h = F.linear(x.to(A.dtype), A) * scale.to(A.dtype)  # computed in the adapter's dtype, as PEFT does
    return F.linear(h, B.to(A.dtype)).to(x.dtype)


@lora_delta.register_fake
def _(x, A, B, scale):
    torch._check(A.dim() == 2 and B.dim() == 2 and scale.dim() == 0, lambda: "lora_delta: A, B must be 2-D, scale 0-d")
    torch._check(x.shape[-1] == A.shape[1], lambda: f"lora_delta: input features {x.shape[-1]} != A's {A.shape[1]}")
    torch._check(B.shape[1] == A.shape[0], lambda: f"lora_delta: B rank {B.shape[1]} != A rank {A.shape[0]}")
    return x.new_empty(*x.shape[:-1], B.shape[0])


def _lora_setup(ctx, inputs, output):
    x, A, B, scale = inputs
    ctx.save_for_backward(x, A, B, scale)


def _lora_backward(ctx, grad):
    x, A, B, scale = ctx.saved_tensors
    s = scale.to(A.dtype)
    g = grad.to(A.dtype)
    dh = (g @ B.to(A.dtype)) * s                             # [..., r]
    dx = (dh @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
    flat = x.reshape(-1, x.shape[-1]).to(A.dtype)
    dA = dh.reshape(-1, dh.shape[-1]).T @ flat if ctx.needs_input_grad[1] else None
    dB = None
    if ctx.needs_input_grad[2]:
        h = (flat @ A.T) * s
        dB = (g.reshape(-1, g.shape[-1]).T @ h).to(B.dtype)
    return dx, dA, dB, None


lora_delta.register_autograd(_lora_backward, setup_context=_lora_setup)
register_arg_roles(torch.ops.splice.lora_delta.default, {1: "adapter", 2: "adapter", 3: "adapter_scale"})

# -------------------------------------------------------------------- folded_adapter


@torch.library.custom_op("splice::folded_adapter", mutates_args=())
def folded_adapter(base: torch.Tensor, tensors: list[torch.Tensor], spec: str) -> torch.Tensor:
    """A record, not a computation: ``adapter.fold`` keeps here what ``adapter.unfold`` needs (the
    adapter's tensors, the base tensors re-quantization replaced, ``spec`` as JSON), beside the
    base op whose output is ``base``. Returns a 0-d zero that nothing reads; fx keeps the node
    because it is marked side-effectful, and ONNX export drops it with its tensors."""
    return base.new_zeros(())


@folded_adapter.register_fake
def _(base, tensors, spec):
    return base.new_zeros(())


torch.fx.node.has_side_effect(torch.ops.splice.folded_adapter.default)

# ---------------------------------------------------------------- fake_quant_linear


@torch.library.custom_op("splice::fake_quant_linear", mutates_args=())
def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """QAT's linear (``quantize.qat``): ``y = x @ fq(weight).T + bias``, the latent float weight
    ``[N, K]`` rounded onto its group grid (scales ``[N, K/group_size]``, zeros packed as
    ``qlinear``'s or None) and dequantized (``kernels/fake_quant.py``); equals ``splice::qlinear``
    on the codes ``quantize.convert`` stores. Trainable: STE for the weight, LSQ for the scales."""
    return F.linear(x, fake_quantize(weight, scales, zeros, bits, group_size).to(x.dtype), bias)


@fake_quant_linear.register_fake
def _(x, weight, scales, zeros, bias, bits, group_size):
    torch._check(weight.dim() == 2 and weight.shape[1] % group_size == 0,
                 lambda: "fake_quant_linear: weight must be [N, K] with K divisible by group_size")
    torch._check(tuple(scales.shape) == (weight.shape[0], weight.shape[1] // group_size),
                 lambda: f"fake_quant_linear: scales {tuple(scales.shape)} != [N, K/group_size]")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "fake_quant_linear: input features != K")
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fql_setup(ctx, inputs, output):
    x, weight, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(x, weight, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size


def _fql_backward(ctx, grad):
    x, weight, scales, zeros = ctx.saved_tensors
    wq, inside, d_scale = fake_quantize_for_backward(weight, scales, zeros, ctx.bits, ctx.group_size)
    g2 = grad.reshape(-1, grad.shape[-1])
    dx = (grad @ wq.to(grad.dtype)) if ctx.needs_input_grad[0] else None
    dw = ds = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_wq = (g2.T.float() @ x.reshape(-1, x.shape[-1]).float()).reshape(d_scale.shape)
        dw = torch.where(inside, grad_wq, 0.0).reshape(weight.shape).to(weight.dtype)  # straight-through
        ds = (grad_wq * d_scale).sum(-1).to(scales.dtype)  # LSQ
    db = g2.sum(0) if ctx.needs_input_grad[4] else None
    return dx, dw, ds, None, db, None, None


fake_quant_linear.register_autograd(_fql_backward, setup_context=_fql_setup)
register_kind(torch.ops.splice.fake_quant_linear.default, "linear")
register_arg_roles(torch.ops.splice.fake_quant_linear.default, {1: "weight", 2: "scale", 3: "zero_point", 4: "bias"})

# ------------------------------------------------------------------------ lut_linear


@torch.library.custom_op("splice::lut_linear", mutates_args=())
def lut_linear(x: torch.Tensor, qweight: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor | None,
               bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``y = x @ W.T + bias`` with a non-uniform (look-up-table) weight (``quantize.nonuniform``):
    ``W[n, k] = lut[n, k // (K/G_lut), idx[n, k]] · scales[n, k // group_size]``.

    qweight: packed indices, uint8 ``[N, G, group_size*bits/8]`` (``qlinear``'s layout);
    lut: ``[N, G_lut, 2**bits]`` levels, ``G_lut`` dividing ``G``; scales: ``[N, G]`` or None.
    """
    return F.linear(x, lut_dequantize(qweight, lut, scales, bits, group_size).to(x.dtype), bias)


@lut_linear.register_fake
def _(x, qweight, lut, scales, bias, bits, group_size):
    torch._check(qweight.dtype == torch.uint8 and qweight.dim() == 3, lambda: "lut_linear: qweight must be uint8 [N, G, blob]")
    torch._check(qweight.shape[2] == (group_size * bits + 7) // 8, lambda: "lut_linear: qweight blob width does not match bits/group_size")
    torch._check(lut.dim() == 3 and lut.shape[0] == qweight.shape[0] and lut.shape[2] == 2 ** bits,
                 lambda: f"lut_linear: lut {tuple(lut.shape)} must be [N, G_lut, 2**bits]")
    torch._check(qweight.shape[1] % lut.shape[1] == 0, lambda: "lut_linear: lut groups must divide qweight groups")
    torch._check(scales is None or tuple(scales.shape) == tuple(qweight.shape[:2]),
                 lambda: "lut_linear: scales must be [N, G]")
    torch._check(x.shape[-1] == qweight.shape[1] * group_size, lambda: "lut_linear: input features != G * group_size")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


frozen_weight_autograd(lut_linear, lut_dequantize)
register_kind(torch.ops.splice.lut_linear.default, "linear")
register_arg_roles(torch.ops.splice.lut_linear.default, {1: "qweight", 2: "lut", 3: "scale", 4: "bias"})

# ---------------------------------------------------------- factored adapter deltas
# NOLA, SVFit, SORSA, FLoRA, TeRA (passes/adapters/): each builds its update from small factors
# (math in kernels/factored.py) and differentiates by recomputing it (autograd_by_recompute).


def _nola(x: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor, basis_a: torch.Tensor,
          basis_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """NOLA's update (https://arxiv.org/abs/2310.02556): ``lora_delta(x, A, B, scale)`` with
    ``A = Σ_k coef_a[k]·basis_a[k]`` (bases ``[k, r, in]``) and ``B = Σ_k coef_b[k]·basis_b[k]``
    (bases ``[k, out, r]``)."""
    a, b = nola_factors(coef_a, coef_b, basis_a, basis_b)
    return lora_delta(x, a, b, scale)


def _svd(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An SVD-form update ``U·diag(S)·Vh`` (``U [out, r]``, ``S [r]``, ``Vh [r, in]``), applied as LoRA
    with ``A = diag(S)·Vh``, ``B = U``. SVFit trains ``S`` only, SORSA all three."""
    return lora_delta(x, S[:, None] * Vh, U, scale)


def _flora_conv2d(x: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor, u_h: torch.Tensor,
                  u_w: torch.Tensor, scale: torch.Tensor, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int) -> torch.Tensor:
    """FLoRA's conv update (https://arxiv.org/abs/2403.14541): ``conv2d(x, ΔW·scale)`` with the same
    stride/padding/dilation/groups as the base conv and ``ΔW = core ×₁ u_out ×₂ u_in ×₃ u_h ×₄ u_w``
    (``[O, I/groups, kh, kw]``)."""
    w = tucker4(core, u_out, u_in, u_h, u_w) * scale
    return F.conv2d(x.to(w.dtype), w, None, stride, padding, dilation, groups).to(x.dtype)


def _tera(x: torch.Tensor, lam: torch.Tensor, core: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor,
          f3: torch.Tensor, f4: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """TeRA's update (https://arxiv.org/abs/2509.03234): ``x @ ΔWᵀ · scale`` with ``ΔW [out, in]`` the
    Tucker product of a frozen random core and frozen random factors ``f_n [I_n, r_n]`` scaled by the
    trainable vector ``lam`` (``Σ r_n``), ``out = I1·I2``, ``in = I3·I4`` (``factored.tera_update``)."""
    w = tera_update(lam, core, f1, f2, f3, f4)
    return (F.linear(x.to(w.dtype), w) * scale.to(w.dtype)).to(x.dtype)


nola_delta = torch.library.custom_op("splice::nola_delta", _nola, mutates_args=())
svfit_delta = torch.library.custom_op("splice::svfit_delta", _svd, mutates_args=())
sorsa_delta = torch.library.custom_op("splice::sorsa_delta", _svd, mutates_args=())
flora_conv2d_delta = torch.library.custom_op("splice::flora_conv2d_delta", _flora_conv2d, mutates_args=())
tera_delta = torch.library.custom_op("splice::tera_delta", _tera, mutates_args=())


@nola_delta.register_fake
def _(x, coef_a, coef_b, basis_a, basis_b, scale):
    torch._check(basis_a.dim() == 3 and basis_b.dim() == 3, lambda: "nola_delta: bases must be [k, r, in] / [k, out, r]")
    torch._check(coef_a.shape == basis_a.shape[:1] and coef_b.shape == basis_b.shape[:1],
                 lambda: "nola_delta: one coefficient per basis matrix")
    torch._check(basis_b.shape[2] == basis_a.shape[1], lambda: "nola_delta: bases disagree on the rank")
    torch._check(x.shape[-1] == basis_a.shape[2], lambda: f"nola_delta: input features {x.shape[-1]} != {basis_a.shape[2]}")
    return x.new_empty(*x.shape[:-1], basis_b.shape[1])


def _svd_fake(x, U, S, Vh, scale):
    torch._check(U.dim() == 2 and S.dim() == 1 and Vh.dim() == 2, lambda: "svd delta: U, Vh must be 2-D, S 1-D")
    torch._check(U.shape[1] == S.shape[0] == Vh.shape[0], lambda: "svd delta: U, S, Vh disagree on the rank")
    torch._check(x.shape[-1] == Vh.shape[1], lambda: f"svd delta: input features {x.shape[-1]} != Vh's {Vh.shape[1]}")
    return x.new_empty(*x.shape[:-1], U.shape[0])


svfit_delta.register_fake(_svd_fake)
sorsa_delta.register_fake(_svd_fake)


@flora_conv2d_delta.register_fake
def _(x, core, u_out, u_in, u_h, u_w, scale, stride, padding, dilation, groups):
    factors = (u_out, u_in, u_h, u_w)
    torch._check(core.dim() == 4 and all(f.dim() == 2 for f in factors), lambda: "flora_conv2d_delta: core 4-D, factors 2-D")
    torch._check(all(f.shape[1] == core.shape[i] for i, f in enumerate(factors)),
                 lambda: "flora_conv2d_delta: factor widths != core dims")
    torch._check(x.dim() == 4 and x.shape[1] == u_in.shape[0] * groups,
                 lambda: f"flora_conv2d_delta: input channels {x.shape[1]} != {u_in.shape[0]} x {groups} groups")
    w = x.new_empty(u_out.shape[0], u_in.shape[0], u_h.shape[0], u_w.shape[0])
    return F.conv2d(x, w, None, stride, padding, dilation, groups)


@tera_delta.register_fake
def _(x, lam, core, f1, f2, f3, f4, scale):
    factors = (f1, f2, f3, f4)
    torch._check(core.dim() == 4 and all(f.dim() == 2 for f in factors), lambda: "tera_delta: core 4-D, factors 2-D")
    torch._check(all(f.shape[1] == core.shape[i] for i, f in enumerate(factors)), lambda: "tera_delta: factor widths != core dims")
    torch._check(lam.dim() == 1 and lam.shape[0] == sum(f.shape[1] for f in factors),
                 lambda: "tera_delta: lam must hold one entry per factor column")
    torch._check(x.shape[-1] == f3.shape[0] * f4.shape[0], lambda: f"tera_delta: input features {x.shape[-1]} != I3*I4")
    return x.new_empty(*x.shape[:-1], f1.shape[0] * f2.shape[0])


for _op, _math in ((nola_delta, _nola), (svfit_delta, _svd), (sorsa_delta, _svd),
                   (flora_conv2d_delta, _flora_conv2d), (tera_delta, _tera)):
    autograd_by_recompute(_op, _math)
register_arg_roles(torch.ops.splice.nola_delta.default,
                   {1: "adapter", 2: "adapter", 3: "adapter_frozen", 4: "adapter_frozen", 5: "adapter_scale"})
register_arg_roles(torch.ops.splice.svfit_delta.default,
                   {1: "adapter_frozen", 2: "adapter", 3: "adapter_frozen", 4: "adapter_scale"})
register_arg_roles(torch.ops.splice.sorsa_delta.default, {1: "adapter", 2: "adapter", 3: "adapter", 4: "adapter_scale"})
register_arg_roles(torch.ops.splice.flora_conv2d_delta.default, {i: "adapter" for i in range(1, 6)} | {6: "adapter_scale"})
register_arg_roles(torch.ops.splice.tera_delta.default, {1: "adapter", 7: "adapter_scale"}
                   | {i: "adapter_frozen" for i in range(2, 7)})

# ------------------------------------------------- sparse fine-tuning deltas (masks as adapters)
# Only the selected entries of ΔW are stored and trained: ``values`` (float, trainable) plus a
# fixed bool ``mask`` that says where they go. The mask's shape carries the layer's dims, so the
# fake impls know the output shape and ``Method.delta_weight`` rebuilds the dense update exactly.


def scatter_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense ``[out, in]`` tensor with ``values`` at ``mask``'s True entries (row-major order)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("splice::sparse_delta", mutates_args=())
def sparse_delta(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Unstructured sparse update ``x @ ΔWᵀ · scale``: values ``[nnz]`` scattered into ``ΔW [out, in]``
    at ``mask``'s True entries (bool ``[out, in]``, row-major order, as ``ΔW[mask] = values``)."""
    dw = scatter_mask(values, mask) * scale.to(values.dtype)
    return F.linear(x.to(values.dtype), dw).to(x.dtype)


@sparse_delta.register_fake
def _(x, values, mask, scale):
    torch._check(values.dim() == 1 and mask.dim() == 2 and scale.dim() == 0,
                 lambda: "sparse_delta: values must be 1-D, mask 2-D, scale 0-d")
    torch._check(x.shape[-1] == mask.shape[1], lambda: f"sparse_delta: input features {x.shape[-1]} != mask's {mask.shape[1]}")
    return x.new_empty(*x.shape[:-1], mask.shape[0])


def _sparse_grads(x, values, mask, s, grad, need_x, need_values):
    dx = (grad @ scatter_mask(values, mask) * s).to(x.dtype) if need_x else None
    dv = ((_flat(grad).T @ _flat(x).to(values.dtype)) * s)[mask] if need_values else None
    return dx, dv


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sparse_backward(ctx, grad):
    x, values, mask, scale = ctx.saved_tensors
    dx, dv = _sparse_grads(x, values, mask, scale.to(values.dtype), grad.to(values.dtype), *ctx.needs_input_grad[:2])
    return dx, dv, None, None


sparse_delta.register_autograd(_sparse_backward, setup_context=_save_inputs)


@torch.library.custom_op("splice::row_delta", mutates_args=())
def row_delta(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Update of the chosen output rows only: values ``[k, in]`` are the rows of ΔW where the
    bool ``mask [out]`` is True; computes ``x @ valuesᵀ · scale`` (k outputs) and places them."""
    h = F.linear(x.to(values.dtype), values) * scale.to(values.dtype)
    out = h.new_zeros(*h.shape[:-1], mask.shape[0])
    return out.index_copy_(-1, mask.nonzero().squeeze(1), h).to(x.dtype)


@row_delta.register_fake
def _(x, values, mask, scale):
    torch._check(values.dim() == 2 and mask.dim() == 1 and scale.dim() == 0,
                 lambda: "row_delta: values must be 2-D, mask 1-D, scale 0-d")
    torch._check(x.shape[-1] == values.shape[1], lambda: f"row_delta: input features {x.shape[-1]} != values' {values.shape[1]}")
    return x.new_empty(*x.shape[:-1], mask.shape[0])


def _row_backward(ctx, grad):
    x, values, mask, scale = ctx.saved_tensors
    g = grad.to(values.dtype).index_select(-1, mask.nonzero().squeeze(1)) * scale.to(values.dtype)
    dx = (g @ values).to(x.dtype) if ctx.needs_input_grad[0] else None
    dv = _flat(g).T @ _flat(x).to(values.dtype) if ctx.needs_input_grad[1] else None
    return dx, dv, None, None


row_delta.register_autograd(_row_backward, setup_context=_save_inputs)


@torch.library.custom_op("splice::col_delta", mutates_args=())
def col_delta(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Update of the chosen input columns only: values ``[out, k]`` are the columns of ΔW where the
    bool ``mask [in]`` is True; computes ``x[..., chosen] @ valuesᵀ · scale``."""
    picked = x.to(values.dtype).index_select(-1, mask.nonzero().squeeze(1))
    return (F.linear(picked, values) * scale.to(values.dtype)).to(x.dtype)


@col_delta.register_fake
def _(x, values, mask, scale):
    torch._check(values.dim() == 2 and mask.dim() == 1 and scale.dim() == 0,
                 lambda: "col_delta: values must be 2-D, mask 1-D, scale 0-d")
    torch._check(x.shape[-1] == mask.shape[0], lambda: f"col_delta: input features {x.shape[-1]} != mask's {mask.shape[0]}")
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _col_backward(ctx, grad):
    x, values, mask, scale = ctx.saved_tensors
    cols = mask.nonzero().squeeze(1)
    g = grad.to(values.dtype) * scale.to(values.dtype)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = x.new_zeros(x.shape).index_copy_(-1, cols, (g @ values).to(x.dtype))
    dv = _flat(g).T @ _flat(x).to(values.dtype).index_select(-1, cols) if ctx.needs_input_grad[1] else None
    return dx, dv, None, None


col_delta.register_autograd(_col_backward, setup_context=_save_inputs)


@torch.library.custom_op("splice::dsee_delta", mutates_args=())
def dsee_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """DSEE's update (https://arxiv.org/abs/2111.00160): low-rank plus sparse,
    ``x @ (B A + S)ᵀ · scale`` with ``S`` = values at ``mask`` (as ``sparse_delta``)."""
    return lora_delta(x, A, B, scale) + sparse_delta(x, values, mask, scale)


@dsee_delta.register_fake
def _(x, A, B, values, mask, scale):
    torch._check(tuple(mask.shape) == (B.shape[0], A.shape[1]), lambda: "dsee_delta: mask must be [out, in] of B A")
    return lora_delta(x, A, B, scale)


def _dsee_backward(ctx, grad):
    x, A, B, values, mask, scale = ctx.saved_tensors
    s, g = scale.to(A.dtype), grad.to(A.dtype)
    dh = (g @ B) * s
    dx_sparse, dv = _sparse_grads(x, values, mask, s, g, ctx.needs_input_grad[0], ctx.needs_input_grad[3])
    dx = dx_sparse + (dh @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
    dA = _flat(dh).T @ _flat(x).to(A.dtype) if ctx.needs_input_grad[1] else None
    dB = _flat(g).T @ (_flat(x).to(A.dtype) @ A.T * s) if ctx.needs_input_grad[2] else None
    return dx, dA, dB, dv, None, None


dsee_delta.register_autograd(_dsee_backward, setup_context=_save_inputs)
for _name in ("sparse_delta", "row_delta", "col_delta"):
    register_arg_roles(getattr(torch.ops.splice, _name).default, {1: "adapter", 2: "adapter_index", 3: "adapter_scale"})
register_arg_roles(torch.ops.splice.dsee_delta.default, {1: "adapter", 2: "adapter", 3: "adapter", 4: "adapter_index",
                                                         5: "adapter_scale"})

# ------------------------------------------------------ vera / bone / adalora deltas


@torch.library.custom_op("splice::vera_delta", mutates_args=())
def vera_delta(x: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor, vera_A: torch.Tensor,
               vera_B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """VeRA's update (https://arxiv.org/abs/2310.11454): ``λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x))) · scale``.
    lambda_d ``[r]``, lambda_b ``[out]`` (trainable); vera_A ``[r, max_in]``, vera_B ``[max_out, r]``:
    one frozen random pair shared by every layer of the adapter, sliced per layer (PEFT's layout)."""
    return adapter_math.vera_forward(x, lambda_d, lambda_b, vera_A, vera_B, scale)


@vera_delta.register_fake
def _(x, lambda_d, lambda_b, vera_A, vera_B, scale):
    torch._check(vera_A.dim() == 2 and vera_B.dim() == 2 and scale.dim() == 0, lambda: "vera_delta: A, B 2-D, scale 0-d")
    torch._check(lambda_d.shape[0] == vera_A.shape[0] == vera_B.shape[1], lambda: "vera_delta: rank of lambda_d, A, B differ")
    torch._check(x.shape[-1] <= vera_A.shape[1], lambda: f"vera_delta: input features {x.shape[-1]} > vera_A's {vera_A.shape[1]}")
    torch._check(lambda_b.shape[0] <= vera_B.shape[0], lambda: "vera_delta: lambda_b longer than vera_B's rows")
    return x.new_empty(*x.shape[:-1], lambda_b.shape[0])


@torch.library.custom_op("splice::bone_delta", mutates_args=())
def bone_delta(x: torch.Tensor, block: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MiSS/Bone's update (https://arxiv.org/abs/2409.15371): the sum of ``x``'s ``r``-wide blocks
    (zero-padded) times ``block [r, out]``, times ``scale``; ΔW repeats ``blockᵀ`` along ``in``."""
    return adapter_math.bone_forward(x, block, scale)


@bone_delta.register_fake
def _(x, block, scale):
    torch._check(block.dim() == 2 and scale.dim() == 0, lambda: "bone_delta: block must be [r, out], scale 0-d")
    torch._check(block.shape[0] <= x.shape[-1], lambda: f"bone_delta: r {block.shape[0]} > input features {x.shape[-1]}")
    return x.new_empty(*x.shape[:-1], block.shape[1])


@torch.library.custom_op("splice::bone_mini_delta", mutates_args=())
def bone_mini_delta(x: torch.Tensor, y: torch.Tensor, block: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MiSS ``mini`` (https://arxiv.org/abs/2409.15371): ``bone_delta`` with ``block [r, mini_r]``
    repeated along the output to the base output ``y``'s width (``y`` is read for its width only)."""
    return adapter_math.bone_mini_forward(x, y, block, scale)


@bone_mini_delta.register_fake
def _(x, y, block, scale):
    torch._check(block.dim() == 2 and scale.dim() == 0, lambda: "bone_mini_delta: block must be [r, mini_r], scale 0-d")
    torch._check(block.shape[0] <= x.shape[-1], lambda: f"bone_mini_delta: r {block.shape[0]} > input features {x.shape[-1]}")
    torch._check(y.shape[-1] % block.shape[1] == 0,
                 lambda: f"bone_mini_delta: mini_r {block.shape[1]} does not divide output features {y.shape[-1]}")
    return x.new_empty(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("splice::adalora_delta", mutates_args=())
def adalora_delta(x: torch.Tensor, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                  ranknum: torch.Tensor) -> torch.Tensor:
    """AdaLoRA's SVD-form update (https://arxiv.org/abs/2303.10512): ``(x (A ⊙ E)ᵀ Bᵀ) · scale / ranknum``,
    PEFT's ``lora_A [r, in]``, ``lora_E [r, 1]``, ``lora_B [out, r]``, scale = alpha (× the adapter's
    weight), ranknum = PEFT's ``ranknum + 1e-5`` (0-d)."""
    return adapter_math.adalora_forward(x, A, E, B, scale, ranknum)


@adalora_delta.register_fake
def _(x, A, E, B, scale, ranknum):
    torch._check(A.dim() == 2 and B.dim() == 2 and scale.dim() == 0 and ranknum.dim() == 0,
                 lambda: "adalora_delta: A, B 2-D, scale and ranknum 0-d")
    torch._check(tuple(E.shape) == (A.shape[0], 1), lambda: f"adalora_delta: E {tuple(E.shape)} != [r, 1]")
    torch._check(x.shape[-1] == A.shape[1], lambda: f"adalora_delta: input features {x.shape[-1]} != A's {A.shape[1]}")
    torch._check(B.shape[1] == A.shape[0], lambda: f"adalora_delta: B rank {B.shape[1]} != A rank {A.shape[0]}")
    return x.new_empty(*x.shape[:-1], B.shape[0])


autograd_by_recompute(vera_delta, adapter_math.vera_forward)
autograd_by_recompute(bone_delta, adapter_math.bone_forward)
autograd_by_recompute(bone_mini_delta, adapter_math.bone_mini_forward)
autograd_by_recompute(adalora_delta, adapter_math.adalora_forward)
register_arg_roles(torch.ops.splice.vera_delta.default,
                   {1: "adapter", 2: "adapter", 3: "adapter_frozen", 4: "adapter_frozen", 5: "adapter_scale"})
register_arg_roles(torch.ops.splice.bone_delta.default, {1: "adapter", 2: "adapter_scale"})
register_arg_roles(torch.ops.splice.bone_mini_delta.default, {2: "adapter", 3: "adapter_scale"})
register_arg_roles(torch.ops.splice.adalora_delta.default,
                   {1: "adapter", 2: "adapter", 3: "adapter", 4: "adapter_scale", 5: "adapter_scale"})

# ---------------------------------------------------------------------- w8a8_linear


@torch.library.custom_op("splice::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``quantize.w8a8``'s linear: int8 weights ``[N, K]`` with a scale per output channel
    ``w_scale [N]``, activations quantized to int8 per token at run time; the exact arithmetic
    (which ONNX Runtime's ``MatMulIntegerToFloat`` reproduces) is in ``kernels/w8a8.py``."""
    return w8a8_matmul(x, qweight, w_scale, bias)


@w8a8_linear.register_fake
def _(x, qweight, w_scale, bias):
    torch._check(qweight.dtype == torch.int8 and qweight.dim() == 2, lambda: "w8a8_linear: qweight must be int8 [N, K]")
    torch._check(tuple(w_scale.shape) == (qweight.shape[0],), lambda: f"w8a8_linear: w_scale {tuple(w_scale.shape)} != [N]")
    torch._check(x.shape[-1] == qweight.shape[1], lambda: f"w8a8_linear: input features {x.shape[-1]} != K {qweight.shape[1]}")
    torch._check(bias is None or tuple(bias.shape) == (qweight.shape[0],), lambda: "w8a8_linear: bias must be [N]")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


register_kind(torch.ops.splice.w8a8_linear.default, "linear")
register_arg_roles(torch.ops.splice.w8a8_linear.default, {1: "qweight", 2: "scale", 3: "bias"})

# ------------------------------ adapter ops that read the base layer (DoRA, SSF; IA3, Bat recompute it)
# The base's operands come first (x; y, the base output; W, b), then the adapter's tensors; the
# math is in kernels/base_deltas.py. Gradients by recomputation (DoRA's norm is detached there).


@torch.library.custom_op("splice::dora_delta", mutates_args=())
def dora_delta(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
               B: torch.Tensor, magnitude: torch.Tensor, lora_scale: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DoRA (https://arxiv.org/abs/2402.09353): ``y + delta = m/‖W+sBA‖·(W+sBA) x + b``. A ``[r, in]``,
    B ``[out, r]`` (PEFT's lora_A/lora_B), magnitude ``[out]`` (PEFT's lora_magnitude_vector),
    lora_scale = alpha / r, scale the adapter's 0-d weight."""
    return base_deltas.dora_forward(x, y, weight, bias, A, B, magnitude, lora_scale, scale)


@dora_delta.register_fake
def _(x, y, weight, bias, A, B, magnitude, lora_scale, scale):
    torch._check(A.dim() == 2 and B.dim() == 2 and weight.dim() == 2, lambda: "dora_delta: A, B, weight must be 2-D")
    torch._check(tuple(weight.shape) == (B.shape[0], A.shape[1]) and B.shape[1] == A.shape[0],
                 lambda: f"dora_delta: weight {tuple(weight.shape)} != [out, in] of B {tuple(B.shape)} A {tuple(A.shape)}")
    torch._check(tuple(magnitude.shape) == (B.shape[0],), lambda: "dora_delta: magnitude must be [out]")
    torch._check(x.shape[-1] == A.shape[1] and y.shape[-1] == B.shape[0], lambda: "dora_delta: x / y features != in / out")
    return torch.empty_like(y)


@torch.library.custom_op("splice::ia3_scale", mutates_args=())
def ia3_scale(y: torch.Tensor, l: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """IA3 (https://arxiv.org/abs/2205.05638) on a layer's output: ``y·l``, l ``[out]`` (recomputes:
    the result replaces the base output ``y``)."""
    return base_deltas.ia3_scale_forward(y, l, scale)


@torch.library.custom_op("splice::ia3_ff_linear", mutates_args=())
def ia3_ff_linear(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """IA3 on a feedforward layer's input: ``linear(x·l, W, b)``, l ``[in]`` (recomputes the layer;
    ``y``, the base output it replaces, is not read)."""
    return base_deltas.ia3_ff_forward(y, x, weight, bias, l, scale)


@torch.library.custom_op("splice::bat_linear", mutates_args=())
def bat_linear(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """MiSS's Bat (https://arxiv.org/abs/2409.15371): ``linear(x, W + ΔW, b)``, ``ΔW_ij = W_ij B_i + B_i``
    on ``r×r`` blocks of ``W [out, in]`` with ``block [out/r, r, r]`` (recomputes the layer)."""
    return base_deltas.bat_forward(y, x, weight, bias, block, scale)


@torch.library.custom_op("splice::ssf_delta", mutates_args=())
def ssf_delta(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """SSF (https://arxiv.org/abs/2210.08823): ``y·γ + β`` as ``y + (γ - 1)·y + β``, γ, β ``[out]``."""
    return base_deltas.scale_shift_forward(y, gamma, beta, scale)


def _channel_fake(name, y, *vectors):
    torch._check(all(v.dim() == 1 and v.shape[0] == y.shape[-1] for v in vectors),
                 lambda: f"{name}: vectors must be [{y.shape[-1]}] (the output features)")
    return torch.empty_like(y)


ia3_scale.register_fake(lambda y, l, scale: _channel_fake("ia3_scale", y, l))
ssf_delta.register_fake(lambda y, gamma, beta, scale: _channel_fake("ssf_delta", y, gamma, beta))


def _recompute_fake(name, y, x, weight, bias):
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1] and y.shape[-1] == weight.shape[0],
                 lambda: f"{name}: x / y features {x.shape[-1]} / {y.shape[-1]} != weight's [out, in] {tuple(weight.shape)}")
    torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],), lambda: f"{name}: bias must be [out]")
    return torch.empty_like(y)


@ia3_ff_linear.register_fake
def _(y, x, weight, bias, l, scale):
    torch._check(tuple(l.shape) == (weight.shape[1],), lambda: "ia3_ff_linear: l must be [in] of weight")
    return _recompute_fake("ia3_ff_linear", y, x, weight, bias)


@bat_linear.register_fake
def _(y, x, weight, bias, block, scale):
    torch._check(block.dim() == 3 and block.shape[1] == block.shape[2], lambda: "bat_linear: block must be [out/r, r, r]")
    torch._check(weight.shape[0] == block.shape[0] * block.shape[1] and weight.shape[1] % block.shape[2] == 0,
                 lambda: "bat_linear: weight is not a grid of r x r blocks matching block")
    return _recompute_fake("bat_linear", y, x, weight, bias)


autograd_by_recompute(dora_delta, base_deltas.dora_forward)
autograd_by_recompute(ia3_scale, base_deltas.ia3_scale_forward)
autograd_by_recompute(ia3_ff_linear, base_deltas.ia3_ff_forward)
autograd_by_recompute(bat_linear, base_deltas.bat_forward)
autograd_by_recompute(ssf_delta, base_deltas.scale_shift_forward)
register_arg_roles(torch.ops.splice.dora_delta.default,
                   {4: "adapter", 5: "adapter", 6: "adapter", 7: "adapter_scale", 8: "adapter_scale"})
register_arg_roles(torch.ops.splice.ia3_scale.default, {1: "adapter", 2: "adapter_scale"})
register_arg_roles(torch.ops.splice.ia3_ff_linear.default, {2: "weight", 3: "bias", 4: "adapter", 5: "adapter_scale"})
register_arg_roles(torch.ops.splice.bat_linear.default, {2: "weight", 3: "bias", 4: "adapter", 5: "adapter_scale"})
register_arg_roles(torch.ops.splice.ssf_delta.default, {1: "adapter", 2: "adapter", 3: "adapter_scale"})

from splice.kernels import triton as _triton_kernels  # noqa: E402,F401  (CUDA kernels of qlinear; Triton loads lazily)
