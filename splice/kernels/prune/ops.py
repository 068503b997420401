"""``splice::sparse_weight``: a pruned weight stored packed — its kept values in row-major order and
a bitmask of where they sit (1 bit per weight; for 2:4 as small as two 2-bit indices per four
weights) — expanded to the dense weight the layer reads. Artifacts store masked float weights this
way (``ir/sparsity.py``'s ``pack_graph``) and loading expands them back, so the op only ever runs
inside a saved program; it has no backend translation (ONNX Runtime would densify a sparse
initializer at load anyway).
"""
from __future__ import annotations

import torch

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
