"""Pruning ops. ``splice::sparse_weight``: a pruned weight stored packed — its kept values in row-major order and
a bitmask of where they sit (1 bit per weight; for 2:4 as small as two 2-bit indices per four
weights) — expanded to the dense weight the layer reads. Artifacts store masked float weights this
way (``ir/sparsity.py``'s ``pack_graph``) and loading expands them back, so the op only ever runs
inside a saved program; it has no backend translation (ONNX Runtime would densify a sparse
initializer at load anyway).
"""
from __future__ import annotations

import torch

from splice.kernels.prune.gate_math import gate_values
from splice.kernels.registry import register_op


def unpack_mask(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of a uint8 bitmask (most significant bit first) as bools."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:numel].bool()


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask, flattened row-major, as a uint8 bitmask (``unpack_mask`` inverts it)."""
    flat = keep.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)
    return (flat << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


@torch.library.custom_op("splice::sparse_weight", mutates_args=())
def sparse_weight(values: torch.Tensor, bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The dense weight of ``shape``: ``values`` where the bitmask ``bits`` is set, zero elsewhere."""
    numel = 1
    for d in shape:
        numel *= d
    out = values.new_zeros(numel)
    out[unpack_mask(bits, numel)] = values
    return out.reshape(shape)


@sparse_weight.register_fake
def _(values, bits, shape):
    numel = 1
    for d in shape:
        numel *= d
    torch._check(bits.dim() == 1 and bits.shape[0] == (numel + 7) // 8,
                 lambda: f"sparse_weight: bitmask of {bits.shape[0]} bytes for {numel} weights")
    return values.new_empty(shape)


def _sample():
    keep = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    return torch.randn(int(keep.sum())), pack_mask(keep), [4, 8]


register_op(sparse_weight, family="prune", roles={0: "weight", 1: "mask"}, sample_inputs=_sample)


# ------------------------------------------------------------------------------ channel_gate
# Trainable relaxed gates on channels (``prune.channels:mode=gates``): ``gate_math.gate_values``.


def _gate_shape(x: torch.Tensor, dim: int) -> list[int]:
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return shape


@torch.library.custom_op("splice::channel_gate", mutates_args=())
def channel_gate(x: torch.Tensor, log_alpha: torch.Tensor, dim: int, keep: float, penalty: float) -> torch.Tensor:
    """``x`` with channel ``c`` of axis ``dim`` scaled by ``gate_values(log_alpha)[c]``. ``keep`` (the
    share of channels training should leave open) and ``penalty`` (the budget's weight) are read by
    the training hook (``passes/prune/_gates.py``), not here."""
    return x * gate_values(log_alpha).to(x.dtype).reshape(_gate_shape(x, dim))


@channel_gate.register_fake
def _(x, log_alpha, dim, keep, penalty):
    torch._check(log_alpha.dim() == 1, lambda: "channel_gate: log_alpha must be 1-D")
    return torch.empty_like(x)


def _gate_setup(ctx, inputs, output):
    x, log_alpha, dim, _, _ = inputs
    ctx.save_for_backward(x, log_alpha)
    ctx.dim = dim


def _gate_backward(ctx, grad):
    x, log_alpha = ctx.saved_tensors
    with torch.enable_grad():
        a = log_alpha.detach().requires_grad_(True)
        xd = x.detach().requires_grad_(True)
        y = xd * gate_values(a).to(x.dtype).reshape(_gate_shape(x, ctx.dim))
        gx, ga = torch.autograd.grad(y, (xd, a), grad)
    return gx, ga, None, None, None


channel_gate.register_autograd(_gate_backward, setup_context=_gate_setup)


def _gate_sample():
    return torch.randn(2, 3, 8), torch.tensor([-4.0, -0.2, 0.0, 0.3, 1.0, 2.5, 4.0, -1.0]), -1, 0.75, 1.0


register_op(channel_gate, family="prune", roles={1: "gate"}, trainable=True, sample_inputs=_gate_sample,
            translations={"onnx": "splice.kernels.prune.onnx:channel_gate"})


# ---------------------------------------------------------------------------- predicted_topk
# Contextual (input-dependent) sparsity, DejaVu-style (https://arxiv.org/abs/2310.17157): a low-rank
# predictor scores each MLP channel from the block's input, and only the ``k`` best-scored channels
# of each token pass (``prune.dynamic``).


@torch.library.custom_op("splice::predicted_topk", mutates_args=())
def predicted_topk(act: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, k: int) -> torch.Tensor:
    """``act`` [..., m] with all but the ``k`` channels of highest predicted score zeroed per token;
    scores ``(x @ downᵀ) @ upᵀ`` from the block input ``x`` [..., d] (down: [r, d], up: [m, r])."""
    scores = (x.to(down.dtype) @ down.T) @ up.T
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return act * keep.to(act.dtype)


@predicted_topk.register_fake
def _(act, x, down, up, k):
    torch._check(up.shape[0] == act.shape[-1], lambda: "predicted_topk: predictor and channels disagree")
    return torch.empty_like(act)


def _topk_sample():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 8, generator=gen),
            torch.randn(4, 8, generator=gen), torch.randn(16, 4, generator=gen), 6)


register_op(predicted_topk, family="prune", roles={2: "predictor", 3: "predictor"}, sample_inputs=_topk_sample,
            translations={"onnx": "splice.kernels.prune.onnx:predicted_topk"})


# -------------------------------------------------------------------------------- bip_weight
# Bi-level pruning (BiP, https://arxiv.org/abs/2210.04092): a weight multiplied by the binary mask of
# its trainable scores; the scores' gradient is BiP's upper-level gradient (``prune.bip``).


def bip_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the ``k = int(sparsity · numel)`` lowest scores; of the scores tied at the
    cut the lower indices go first, as ONNX ``TopK`` picks them. Linear time (``kthvalue``, no sort):
    it runs on every forward and backward while training."""
    flat = scores.reshape(-1)
    k = int(sparsity * flat.numel())
    if not k:
        return torch.ones_like(scores, dtype=torch.bool)
    cut = flat.kthvalue(k).values
    below, tied = flat < cut, flat == cut
    drop = below | (tied & (tied.cumsum(0) <= k - below.sum()))
    return ~drop.reshape(scores.shape)


@torch.library.custom_op("splice::bip_weight", mutates_args=())
def bip_weight(weight: torch.Tensor, scores: torch.Tensor, sparsity: float, gamma: float,
               mask_lr: float) -> torch.Tensor:
    """``weight ⊙ m``, ``m`` the binary mask keeping the ``1 − sparsity`` highest ``scores``. ``gamma``
    enters the backward; ``mask_lr`` (the scores' projected-SGD step) is read by the training hook."""
    return weight * bip_keep(scores, sparsity).to(weight.dtype)


@bip_weight.register_fake
def _(weight, scores, sparsity, gamma, mask_lr):
    torch._check(scores.shape == weight.shape, lambda: "bip_weight: scores and weight differ in shape")
    return torch.empty_like(weight)


def _bip_setup(ctx, inputs, output):
    weight, scores, sparsity, gamma, _ = inputs
    ctx.save_for_backward(weight, bip_keep(scores, sparsity))
    ctx.gamma = gamma


def _bip_backward(ctx, grad):
    """``∂/∂θ = m ⊙ g``; for the scores BiP's implicit gradient with the Hessian-free (first-order)
    mixed term: ``θ ⊙ g − (1/γ) m ⊙ g²`` (mask passed straight through), ``g = ∂ℓ/∂(m ⊙ θ)``."""
    weight, keep = ctx.saved_tensors
    m = keep.to(grad.dtype)
    return grad * m, (weight * grad - m * grad * grad / ctx.gamma).float(), None, None, None


bip_weight.register_autograd(_bip_backward, setup_context=_bip_setup)


def _bip_sample():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 8, generator=gen)
    scores[0, :4] = 0.5  # ties: dropped lowest index first, by the op and by ONNX TopK
    return torch.randn(6, 8, generator=gen), scores, 0.5, 1.0, 0.1


register_op(bip_weight, family="prune", roles={0: "weight", 1: "score"}, trainable=True, sample_inputs=_bip_sample,
            translations={"onnx": "splice.kernels.prune.onnx:bip_weight"})
