"""Weight-delta ops: ``W = base + decode(payload)``, the weight a fine-tuned layer reads, computed from
its base model's weight and a compressed delta (``passes/delta``). Every op takes the base weight
first (role ``delta_base``), its payload after (role ``delta``), returns a tensor of the base's shape and
dtype, and has one *strength* argument the delta scales linearly with (``STRENGTH``: ``delta.scale``).
Weights of more than two dimensions (conv) are deltas of their ``[out, rest]`` matrix.

* ``delta_dense(base, delta, scale)``: ``base + scale·delta``;
* ``delta_ternary(base, mask, signs, scale)``: ComPEFT's ``scale·mask⊙sign`` (the mask packed 1 bit per
  weight row-major, the signs 1 bit per *kept* weight in the same order);
* ``delta_signs(base, signs[k, rows, ⌈cols/8⌉], u[k, rows], v[k, cols])``: ``Σ_k sign_k ⊙ u_k v_kᵀ``
  (BitDelta: k = 1, ``u`` the per-matrix scale, ``v = 1``; BitStack: ``k`` residual levels);
* ``delta_lowrank(base, A[r, cols], B[rows, r], scale)``: ``scale·B A``;
* ``delta_quant(base, codes[rows, ⌈cols·bits/8⌉], scales[rows], bits)``: symmetric ``bits``-bit codes
  (offset ``2^(bits−1)``) times a scale per row;
* ``delta_base_stub(name, shape, dtype)``: zeros; a delta-only artifact stores it in place of base
  tensor ``name`` and loading binds the base's tensor again (``ir/deltas.py``), so it never runs.

Bits are packed with ``kernels/quant/packing.py`` (least significant bit first).
"""
from __future__ import annotations

import torch

from splice.kernels._sample import Sampler
from splice.kernels.quant.packing import pack_bits, unpack_bits
from splice.kernels.registry import register_op

ONNX = "splice.kernels.delta.onnx"


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, rest]`` (a 1-D tensor as one row)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def pack_flat(bits: torch.Tensor) -> torch.Tensor:
    """A bool tensor, flattened row-major, packed 1 bit per entry (at least one byte)."""
    flat = bits.reshape(1, -1).to(torch.uint8)
    return pack_bits(flat, 1).reshape(-1) if flat.numel() else torch.zeros(1, dtype=torch.uint8)


def unpack_flat(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``pack_flat``'s bytes as bools."""
    return unpack_bits(packed.reshape(1, -1), 1, n).reshape(-1).bool()


def _apply(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``base + delta`` (``delta`` as the base's matrix), in float32, in the base's dtype and shape."""
    return (base.float() + delta.float().reshape(base.shape)).to(base.dtype)


# ----------------------------------------------------------------------------- decoders


def dense_delta(base, delta, scale):
    return delta.float() * scale.float()


def ternary_delta(base, mask, signs, scale):
    keep = unpack_flat(mask, base.numel())
    positive = unpack_flat(signs, int(keep.sum()))
    values = torch.zeros(base.numel())
    values[keep] = positive.float() * 2 - 1
    return as_matrix(values.reshape(base.shape)) * scale.float()


def signs_delta(base, signs, u, v):
    cols = as_matrix(base).shape[1]
    out = torch.zeros(u.shape[1], cols)
    for k in range(signs.shape[0]):
        s = unpack_bits(signs[k], 1, cols).float() * 2 - 1
        out += s * (u[k].float()[:, None] * v[k].float()[None, :])
    return out


def lowrank_delta(base, A, B, scale):
    return (B.float() @ A.float()) * scale.float()


def quant_delta(base, codes, scales, bits):
    cols = as_matrix(base).shape[1]
    return (unpack_bits(codes, bits, cols).float() - (1 << (bits - 1))) * scales.float()[:, None]


# ---------------------------------------------------------------------------------- ops


@torch.library.custom_op("splice::delta_dense", mutates_args=())
def delta_dense(base: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``base + scale·delta`` (``delta`` of the base's shape, ``scale`` 0-d)."""
    return _apply(base, dense_delta(base, delta, scale))


@torch.library.custom_op("splice::delta_ternary", mutates_args=())
def delta_ternary(base: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``base + scale·mask⊙sign`` (ComPEFT, https://arxiv.org/abs/2311.13171; module docstring)."""
    return _apply(base, ternary_delta(base, mask, signs, scale))


@torch.library.custom_op("splice::delta_signs", mutates_args=())
def delta_signs(base: torch.Tensor, signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``base + Σ_k sign_k ⊙ u_k v_kᵀ`` (BitDelta https://arxiv.org/abs/2402.10193, BitStack
    https://arxiv.org/abs/2410.23918)."""
    return _apply(base, signs_delta(base, signs, u, v))


@torch.library.custom_op("splice::delta_lowrank", mutates_args=())
def delta_lowrank(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``base + scale·B A`` (a LoRA-shaped delta, https://arxiv.org/abs/2106.09685)."""
    return _apply(base, lowrank_delta(base, A, B, scale))


@torch.library.custom_op("splice::delta_quant", mutates_args=())
def delta_quant(base: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """``base + (codes − 2^(bits−1))·scales`` per row (Robust Weight Signatures' quantized delta,
    https://arxiv.org/abs/2302.12480)."""
    return _apply(base, quant_delta(base, codes, scales, bits))


@torch.library.custom_op("splice::delta_base_stub", mutates_args=())
def delta_base_stub(name: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``shape`` and ``dtype``: the place of base tensor ``name`` in a delta-only artifact."""
    return torch.zeros(shape, dtype=dtype)


def _fake_like_base(*args):
    return torch.empty_like(args[0])


for _op in (delta_dense, delta_ternary, delta_signs, delta_lowrank, delta_quant):
    _op.register_fake(_fake_like_base)


@delta_base_stub.register_fake
def _(name, shape, dtype):
    return torch.empty(shape, dtype=dtype)


def _dense_backward(ctx, grad):
    delta, scale = ctx.saved_tensors
    g = grad.float()
    return grad, (g * scale).to(delta.dtype), (g * delta.float()).sum().to(scale.dtype)


def _dense_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _signs_backward(ctx, grad):
    """``∂/∂u_k = (g ⊙ S_k) v_k``, ``∂/∂v_k = (g ⊙ S_k)ᵀ u_k`` (BitDelta's scale distillation trains ``u``)."""
    signs, u, v = ctx.saved_tensors
    g = as_matrix(grad).float()
    du, dv = torch.zeros_like(u, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for k in range(signs.shape[0]):
        gs = g * (unpack_bits(signs[k], 1, g.shape[1]).float() * 2 - 1)
        du[k], dv[k] = gs @ v[k].float(), gs.T @ u[k].float()
    return grad, None, du.to(u.dtype), dv.to(v.dtype)


def _signs_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])


delta_dense.register_autograd(_dense_backward, setup_context=_dense_setup)
delta_signs.register_autograd(_signs_backward, setup_context=_signs_setup)

# ---------------------------------------------------------------------------- records

# the argument each op's delta scales linearly with (``delta.scale`` multiplies it)
STRENGTH = {delta_dense: 2, delta_ternary: 3, delta_signs: 2, delta_lowrank: 3, delta_quant: 2}
# each op's decoder: (op arguments) -> float delta as the base's ``[rows, rest]`` matrix
DECODERS = {delta_dense: dense_delta, delta_ternary: ternary_delta, delta_signs: signs_delta,
            delta_lowrank: lowrank_delta, delta_quant: quant_delta}


def _dense_sample():
    s = Sampler(0)
    return s(6, 8), s(6, 8), s.scalar(0.5)


def _ternary_sample():
    s = Sampler(1)
    base, keep = s(6, 8), s.mask(6, 8, keep=0.3)
    return base, pack_flat(keep), pack_flat(s(int(keep.sum())) > 0), s.scalar(0.25)


def _signs_sample():
    s = Sampler(2)
    return s(6, 10), pack_bits((s(3, 6, 10) > 0).to(torch.uint8), 1), s(3, 6).abs(), s(3, 10).abs()


def _lowrank_sample():
    s = Sampler(3)
    return s(6, 8), s(2, 8), s(6, 2), s.scalar(1.0)


def _quant_sample():
    s = Sampler(4)
    codes = torch.randint(0, 16, (6, 9), generator=s.gen)
    return s(6, 9), pack_bits(codes, 4), s(6).abs() * 0.1, 4


def _stub_sample():
    return "w", [3, 4], torch.float32


def _record(op_def, roles, sample):
    register_op(op_def, family="delta", roles=roles, sample_inputs=sample,
                translations={"onnx": f"{ONNX}:{op_def._name}"})


_record(delta_dense, {0: "delta_base", 1: "delta", 2: "delta"}, _dense_sample)
_record(delta_ternary, {0: "delta_base", 1: "delta", 2: "delta", 3: "delta"}, _ternary_sample)
_record(delta_signs, {0: "delta_base", 1: "delta", 2: "delta", 3: "delta"}, _signs_sample)
_record(delta_lowrank, {0: "delta_base", 1: "delta", 2: "delta", 3: "delta"}, _lowrank_sample)
_record(delta_quant, {0: "delta_base", 1: "delta", 2: "delta"}, _quant_sample)
register_op(delta_base_stub, family="delta", sample_inputs=_stub_sample)
