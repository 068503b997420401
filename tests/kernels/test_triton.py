"""The Triton ``splice::qlinear`` kernel against the reference op, on CPU through Triton's
interpreter (``TRITON_INTERPRET=1``, set in conftest.py before anything imports triton; small
shapes); skipped when triton is not installed."""
import pytest
import torch

import splice  # noqa: F401  (registers the ops)
from splice.kernels.quant.grid import GroupGrid

pytest.importorskip("triton")
from splice.kernels.quant import triton as kernel  # noqa: E402


def _layer(bits, group_size, symmetric, n=40, k=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    grid = GroupGrid(bits, group_size, symmetric)
    scale, zero = grid.params(w)
    return grid.pack_codes(grid.quantize(w, scale, zero)), scale, grid.pack_zeros(zero), torch.randn(n, generator=gen)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, 64, False), (4, 128, False),
                                                       (8, 16, False), (8, 64, True)])
@pytest.mark.parametrize("lead", [(1,), (3, 7), (20,)])  # batch-1 decode, [B, T] activations, > one M block
def test_kernel_matches_reference(bits, group_size, symmetric, lead):
    q, s, z, b = _layer(bits, group_size, symmetric)
    x = torch.randn(*lead, q.shape[1] * group_size, generator=torch.Generator().manual_seed(1))
    for bias in (b, None):
        want = torch.ops.splice.qlinear(x, q, s, z, bias, bits, group_size)
        got = kernel.qlinear(x, q, s, z, bias, bits, group_size)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_fp16_activations_and_scales():
    q, s, z, b = _layer(4, 32, False)
    x = torch.randn(2, 128).half()
    want = torch.ops.splice.qlinear(x, q, s.half(), z, b.half(), 4, 32)
    got = kernel.qlinear(x, q, s.half(), z, b.half(), 4, 32)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-2)


def test_registered_as_the_cuda_kernel_for_supported_formats():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("splice::qlinear", "CUDA")
    assert kernel.supports(4, 32) and kernel.supports(8, 128)
    assert not kernel.supports(3, 32) and not kernel.supports(2, 64) and not kernel.supports(4, 8)
