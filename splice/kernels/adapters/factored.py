"""Plain-torch math of the factored adapter updates (NOLA, SVFit, SORSA, FLoRA, TeRA), shared by
their custom ops (``kernels/adapters/delta_ops.py``, the reference implementations), their ``Method.delta_weight``
(folding) and their autograd.

Each update is built from small factors into a dense weight-shaped tensor:

* ``nola_factors``: ``A = Σ_k coef_a[k] basis_a[k]`` ``[r, in]``, ``B = Σ_k coef_b[k] basis_b[k]`` ``[out, r]``;
* ``tucker4``: ``G ×₁ F1 ×₂ F2 ×₃ F3 ×₄ F4`` for a core ``[r1, r2, r3, r4]`` and factors ``[I_n, r_n]``;
* ``tera_update``: a Tucker product whose factors are scaled column-wise by a trainable vector
  (split over the four modes), reshaped to ``[out, in]``.

``autograd_by_recompute`` gives an op whose reference is one of these formulas its backward: the
formula is re-run on the saved inputs with grad enabled and differentiated (the factors are small,
so recomputing is cheap, and nothing but the inputs is kept).
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def nola_factors(coef_a, coef_b, basis_a, basis_b) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's ``A [r, in]`` and ``B [out, r]`` as coefficient-weighted sums of random bases."""
    return torch.tensordot(coef_a, basis_a, 1), torch.tensordot(coef_b, basis_b, 1)


def tucker4(core: torch.Tensor, f1, f2, f3, f4) -> torch.Tensor:
    """``core ×₁ f1 ×₂ f2 ×₃ f3 ×₄ f4``: ``[I1, I2, I3, I4]`` from ``core [r1..r4]``, ``f_n [I_n, r_n]``."""
    return torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, f1, f2, f3, f4)


def tera_update(lam: torch.Tensor, core: torch.Tensor, f1, f2, f3, f4) -> torch.Tensor:
    """TeRA's ``[out, in]`` update: the Tucker product with factor ``n`` scaled by its slice of ``lam``
    (``diag(λ_n)``); ``out = I1·I2``, ``in = I3·I4``."""
    factors = (f1, f2, f3, f4)
    lams = lam.split([f.shape[1] for f in factors])
    t = tucker4(core, *(f * v for f, v in zip(factors, lams)))
    return t.reshape(f1.shape[0] * f2.shape[0], f3.shape[0] * f4.shape[0])


def autograd_by_recompute(op, math: Callable[..., torch.Tensor]) -> None:
    """Register autograd for custom op ``op`` whose reference implementation is ``math``."""

    def setup(ctx, inputs, output):
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.save_for_backward(*[a for a in inputs if isinstance(a, torch.Tensor)])
        ctx.others = [None if t else a for a, t in zip(inputs, ctx.is_tensor)]

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        args = [next(saved).detach().requires_grad_(need) if t else a
                for a, t, need in zip(ctx.others, ctx.is_tensor, ctx.needs_input_grad)]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need and ctx.is_tensor[i]]
        with torch.enable_grad():
            out = math(*args)
            grads = torch.autograd.grad(out, [args[i] for i in wanted], grad, allow_unused=True)
        by_index = dict(zip(wanted, grads))
        return tuple(by_index.get(i) for i in range(len(args)))

    op.register_autograd(backward, setup_context=setup)
