"""splice custom ops: packing, reference numerics, opcheck, and ORT parity per format."""
import itertools

import pytest
import torch

import splice
from splice.kernels.quant.packing import pack_bits, unpack_bits
from splice.kernels.quant.grid import GroupGrid, dequantize_packed

BITS = range(2, 9)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 37))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (37 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


def test_int4_is_low_nibble_first():
    assert pack_bits(torch.tensor([[1, 2]]), 4).item() == 0x21


def _quantized(bits, group, symmetric, n=24, k=64, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    grid = GroupGrid(bits, group, symmetric)
    scale, zero = grid.params(w)
    codes = grid.quantize(w, scale, zero)
    return w, grid, codes, scale, zero, grid.pack_codes(codes), grid.pack_zeros(zero)


@pytest.mark.parametrize("bits,symmetric", itertools.product(BITS, (True, False)))
def test_qlinear_matches_dequantized_reference(bits, symmetric):
    w, grid, codes, scale, zero, q, z = _quantized(bits, 16, symmetric)
    x = torch.randn(2, 3, 64)
    bias = torch.randn(24)
    ref = torch.nn.functional.linear(x, grid.dequantize(codes, scale, zero), bias)
    torch.testing.assert_close(torch.ops.splice.qlinear(x, q, scale, z, bias, bits, 16), ref)
    err = (grid.dequantize(codes, scale, zero) - w).abs().max()
    assert err <= scale.abs().max() * (0.5 if not symmetric else 1.0) + 1e-6  # within one step of the grid


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, False), (8, True)])
def test_opcheck(bits, symmetric):
    _, _, _, scale, _, q, z = _quantized(bits, 32, symmetric)
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.splice.qlinear.default, (x, q, scale, z, None, bits, 32))
    idx = torch.tensor([[0, 5, 23], [1, 1, 2]])
    torch.library.opcheck(torch.ops.splice.qembedding.default, (idx, q, scale, z, bits, 32))


def test_qembedding_gathers_dequantized_rows():
    _, grid, codes, scale, zero, q, z = _quantized(4, 32, False)
    idx = torch.tensor([[3, 0], [23, 3]])
    table = dequantize_packed(q, scale, z, 4, 32)
    torch.testing.assert_close(torch.ops.splice.qembedding(idx, q, scale, z, 4, 32), table[idx])


def test_qlinear_gradient_flows_to_input():
    _, grid, codes, scale, zero, q, z = _quantized(4, 32, True)
    x = torch.randn(5, 64, requires_grad=True)
    torch.ops.splice.qlinear(x, q, scale, z, None, 4, 32).sum().backward()
    w = grid.dequantize(codes, scale, zero)
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, -1))


class _QModel(torch.nn.Module):
    def __init__(self, bits, group, symmetric):
        super().__init__()
        _, _, _, scale, _, q, z = _quantized(bits, group, symmetric, n=48, k=96)
        self.register_buffer("q", q)
        self.scale = torch.nn.Parameter(scale, requires_grad=False)
        self.register_buffer("z", z) if z is not None else setattr(self, "z", None)
        self.bits, self.group = bits, group

    def forward(self, ids, x):
        e = torch.ops.splice.qembedding(ids, self.q, self.scale, self.z, self.bits, self.group)
        return torch.ops.splice.qlinear(x + e, self.q, self.scale, self.z, None, self.bits, self.group)


@pytest.mark.parametrize("bits,group,symmetric", [(b, g, s) for b in BITS for g, s in ((32, False), (48, True))])
def test_onnx_parity_every_format(bits, group, symmetric, tmp_path):
    """Every bit width exports (fused kernels for 2/4/8 with power-of-two groups, decode otherwise)."""
    m = _QModel(bits, group, symmetric)
    ids, x = torch.randint(0, 48, (2, 7)), torch.randn(2, 7, 96)
    g = splice.capture(m, (ids, x))
    path = splice.export_onnx(g, tmp_path / "q.onnx")
    assert splice.parity(g, path, [(ids, x), (ids[:1, :3], x[:1, :3])]) <= 1e-4
