"""The adapter update ops computed beside a base layer: ``splice::lora_delta`` (and the
``folded_adapter`` record ``adapter.fold`` leaves), the factored deltas (NOLA, SVFit, SORSA, FLoRA,
TeRA; math in ``adapters/factored.py``) and the VeRA / MiSS (Bone) / AdaLoRA deltas (math in
``adapters/adapter_math.py``): schema, reference, fake impl, autograd, and registry record
(roles, sample inputs, ONNX translation in ``adapters/onnx.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.kernels._sample import Sampler
from splice.kernels.adapters import adapter_math
from splice.kernels.adapters.factored import autograd_by_recompute, nola_factors, tera_update, tucker4
from splice.kernels.registry import register_op

ONNX = "splice.kernels.adapters.onnx"


def _adapter(op_def, roles: dict[int, str], sample, onnx: str | None = None) -> None:
    """Record an adapter op: trainable, with its ONNX translation (``adapters/onnx.py``)."""
    register_op(op_def, family="adapters", roles=roles, trainable=True, sample_inputs=sample,
                translations={"onnx": f"{ONNX}:{onnx or op_def._name}"})


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


def _lora_sample():
    s = Sampler()
    return s(2, 3, 8), s(2, 8, grad=True), s(6, 2, grad=True), s.scalar(0.5)


_adapter(lora_delta, {1: "adapter", 2: "adapter", 3: "adapter_scale"}, _lora_sample)

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


def _folded_sample():
    s = Sampler()
    return s(2, 3, 6), [s(2, 8), s(6, 2)], '{"method": "lora"}'


register_op(folded_adapter, family="adapters", sample_inputs=_folded_sample,
            translations={"onnx": f"{ONNX}:folded_adapter"})

# ---------------------------------------------------------- factored adapter deltas
# NOLA, SVFit, SORSA, FLoRA, TeRA (passes/adapters/): each builds its update from small factors
# (math in adapters/factored.py) and differentiates by recomputing it (autograd_by_recompute).


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
    w = (tucker4(core, u_out, u_in, u_h, u_w) * scale).contiguous()  # einsum may hand back channels-last strides
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


def _nola_sample():
    s = Sampler()
    return s(2, 3, 8), s(3, grad=True), s(3, grad=True), s(3, 2, 8), s(3, 6, 2), s.scalar(0.5)


def _svd_sample(trained: tuple[bool, bool, bool]):
    def sample():
        s = Sampler()
        return s(2, 3, 8), s(6, 2, grad=trained[0]), s(2, grad=trained[1]), s(2, 8, grad=trained[2]), s.scalar(0.5)
    return sample


def _flora_sample():
    s = Sampler()
    factors = (s(6, 2, grad=True), s(4, 2, grad=True), s(3, 1, grad=True), s(3, 1, grad=True))
    return s(1, 4, 5, 5), s(2, 2, 1, 1, grad=True), *factors, s.scalar(0.5), [1, 1], [1, 1], [1, 1], 1


def _tera_sample():
    s = Sampler()
    return s(2, 3, 8), s(8, grad=True), s(2, 2, 2, 2), s(2, 2), s(3, 2), s(2, 2), s(4, 2), s.scalar(0.5)


_adapter(nola_delta, {1: "adapter", 2: "adapter", 3: "adapter_frozen", 4: "adapter_frozen", 5: "adapter_scale"},
         _nola_sample)
_adapter(svfit_delta, {1: "adapter_frozen", 2: "adapter", 3: "adapter_frozen", 4: "adapter_scale"},
         _svd_sample((False, True, False)), onnx="svd_delta")
_adapter(sorsa_delta, {1: "adapter", 2: "adapter", 3: "adapter", 4: "adapter_scale"},
         _svd_sample((True, True, True)), onnx="svd_delta")
_adapter(flora_conv2d_delta, {i: "adapter" for i in range(1, 6)} | {6: "adapter_scale"}, _flora_sample)
_adapter(tera_delta, {1: "adapter", 7: "adapter_scale"} | {i: "adapter_frozen" for i in range(2, 7)}, _tera_sample)

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


def _vera_sample():
    s = Sampler()
    return s(2, 3, 8), s(2, grad=True), s(6, grad=True), s(2, 10), s(7, 2), s.scalar(0.5)


def _bone_sample():
    s = Sampler()
    return s(2, 3, 8), s(3, 6, grad=True), s.scalar(0.5)


def _bone_mini_sample():
    s = Sampler()
    return s(2, 3, 8), s(2, 3, 6), s(3, 2, grad=True), s.scalar(0.5)


def _adalora_sample():
    s = Sampler()
    return s(2, 3, 8), s(2, 8, grad=True), s(2, 1, grad=True), s(6, 2, grad=True), s.scalar(0.5), s.scalar(2.0)


_adapter(vera_delta, {1: "adapter", 2: "adapter", 3: "adapter_frozen", 4: "adapter_frozen", 5: "adapter_scale"},
         _vera_sample)
_adapter(bone_delta, {1: "adapter", 2: "adapter_scale"}, _bone_sample)
_adapter(bone_mini_delta, {2: "adapter", 3: "adapter_scale"}, _bone_mini_sample)
_adapter(adalora_delta, {1: "adapter", 2: "adapter", 3: "adapter", 4: "adapter_scale", 5: "adapter_scale"},
         _adalora_sample)
