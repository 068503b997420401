"""Plain-torch forwards of the VeRA, MiSS/Bone and AdaLoRA delta ops (``kernels/adapters/delta_ops.py``), and
the Bat block update (Bat's op, which recomputes the layer, is in ``base_deltas.py``).

Each forward is written as PEFT 0.21's layer ``forward`` computes it (same operations, same
order), so splice and PEFT agree to float rounding; ``scale`` (0-d) is splice's adapter weight.
"""
from __future__ import annotations

import torch.nn.functional as F


def vera_forward(x, lambda_d, lambda_b, vera_A, vera_B, scale):
    """``λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x))) · scale``: the shared ``vera_A [r, max_in]`` /
    ``vera_B [max_out, r]`` sliced to this layer's ``in``/``out`` as PEFT's ``VeraLayer`` does."""
    a = vera_A[:, : x.shape[-1]]
    b = vera_B[: lambda_b.shape[0]]
    h = lambda_d * F.linear(x.to(a.dtype), a)
    return (lambda_b * F.linear(h, b) * scale).to(x.dtype)


def bone_forward(x, block, scale):
    """MiSS/Bone: ``x`` zero-padded to a multiple of ``r``, its ``r``-wide blocks summed, times
    ``block [r, out]`` (PEFT's ``MissLinear`` default forward)."""
    r = block.shape[0]
    xp = F.pad(x.to(block.dtype), (0, (-x.shape[-1]) % r))
    return (xp.reshape(*xp.shape[:-1], -1, r).sum(-2) @ block * scale).to(x.dtype)


def bone_mini_forward(x, y, block, scale):
    """MiSS ``mini``: ``block [r, mini_r]`` repeated along the output to ``[r, out]`` (``out`` =
    the base output ``y``'s width), then ``bone_forward`` (PEFT's ``miss_fn == "mini"``)."""
    return bone_forward(x, block.repeat(1, y.shape[-1] // block.shape[1]), scale)


def bat_update(weight, block):
    """Bat's weight update ``ΔW`` (``[out, in]``): every ``r×r`` block ``W_ij`` of ``W`` becomes
    ``W_ij B_i + B_i`` with ``block [out/r, r, r]`` (PEFT ``MissLinear.get_delta_weight``)."""
    out_f, in_f = weight.shape
    r = block.shape[-1]
    w = weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)
    return (w @ block + block).permute(1, 2, 0, 3).reshape(out_f, in_f)


def adalora_forward(x, A, E, B, scale, ranknum):
    """AdaLoRA's ``P Λ Q`` update: ``(x (A ⊙ E)ᵀ Bᵀ) · scale / ranknum`` (``scale = alpha``, PEFT's
    ``ranknum + 1e-5``), multiplied then divided as PEFT's ``SVDLinear.forward`` does."""
    return (F.linear(F.linear(x.to(A.dtype), A * E), B) * scale / ranknum).to(x.dtype)

