"""``splice::bcq_linear`` (ShiftAddLLM's binary-coded linear): the format and its fitting
(``kernels/reparam/bcq.py``), and its four evaluation forms — reference (unpack -> matmul), lookup
table (``reparam/lut.py``), Triton (interpreted on CPU) and ONNX through ONNX Runtime — agreeing
to 1e-4 on several shapes, group sizes and bit widths."""
import pytest
import torch

import splice  # noqa: F401  (registers the ops)
from splice.kernels.reparam.bcq import dequantize, fit, pack_signs, round_pow2, unpack_signs
from splice.kernels.reparam.lut import bcq_lut_linear

CASES = [(3, 16, 24, 64, True), (1, 8, 10, 32, False), (4, 64, 33, 128, True), (2, 128, 8, 128, False)]


def _layer(bits, group_size, n, k, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes, scales = fit(torch.randn(n, k, generator=gen), bits, group_size, iters=3)
    return codes, scales, torch.randn(n, generator=gen) if bias else None


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def test_sign_packing_round_trips():
    signs = torch.randint(0, 2, (3, 5, 24)).float() * 2 - 1
    codes = pack_signs(signs)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 5, 3)
    assert torch.equal(unpack_signs(codes), signs)


def test_enough_bits_reproduce_a_layer_exactly():
    """As many bit-planes as weights per group (8 × 8): any float layer, to float tolerance; and a
    weight on a uniform symmetric 2-bit grid is reproduced at 2 bits."""
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    x = _x(5, 64)
    codes, scales = fit(w, 8, 8)
    torch.testing.assert_close(dequantize(codes, scales, 8), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.ops.splice.bcq_linear(x, codes, scales, None, 8), x @ w.T, atol=1e-5, rtol=1e-5)
    grid = (torch.randint(0, 4, (40, 64)).float() * 2 - 3) * 0.05
    codes, scales = fit(grid, 2, 32)
    torch.testing.assert_close(dequantize(codes, scales, 32), grid, atol=1e-6, rtol=0)


def test_alternating_least_squares_lowers_the_error():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    errors = [(w - dequantize(*fit(w, 3, 64, iters=it), 64)).norm() for it in (0, 5)]
    assert errors[1] <= errors[0]
    errs = [(w - dequantize(*fit(w, b, 64), 64)).norm() / w.norm() for b in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[2] < 0.2  # 3-bit Gaussian: ~0.18


def test_power_of_two_scales():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    codes, scales = fit(w, 3, 32, pow2=True)
    assert torch.equal(round_pow2(scales), scales)
    assert (w - dequantize(codes, scales, 32)).norm() / w.norm() < 0.3


@pytest.mark.parametrize("bits,group_size,n,k,bias", CASES)
def test_lut_form_matches_reference(bits, group_size, n, k, bias):
    codes, scales, b = _layer(bits, group_size, n, k, bias)
    for lead in ((1,), (3, 7)):
        x = _x(*lead, k)
        want = torch.ops.splice.bcq_linear(x, codes, scales, b, group_size)
        got = bcq_lut_linear(x, codes, scales, b, group_size, rows=16)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,group_size,n,k,bias", CASES[:3])
def test_triton_matches_reference(bits, group_size, n, k, bias):
    pytest.importorskip("triton")
    from splice.kernels.reparam import triton as kernel

    codes, scales, b = _layer(bits, group_size, n, k, bias)
    x = _x(3, 5, k)
    want = torch.ops.splice.bcq_linear(x, codes, scales, b, group_size)
    torch.testing.assert_close(kernel.bcq_linear(x, codes, scales, b, group_size), want, atol=1e-4, rtol=1e-4)


class _Layers(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.meta = []
        for i, (codes, scales, bias, g) in enumerate(layers):
            self.register_buffer(f"c{i}", codes)
            self.register_buffer(f"s{i}", scales)
            if bias is not None:
                self.register_buffer(f"b{i}", bias)
            self.meta.append((bias is not None, g))

    def forward(self, *xs):
        return tuple(torch.ops.splice.bcq_linear(x, getattr(self, f"c{i}"), getattr(self, f"s{i}"),
                                                 getattr(self, f"b{i}") if has_bias else None, g)
                     for i, (x, (has_bias, g)) in enumerate(zip(xs, self.meta)))


def test_onnx_keeps_codes_packed_and_matches_reference():
    import onnxruntime as ort

    from splice.kernels.registry import ONNX_OPSET, translations

    # the exporter's optimizer folds constant subgraphs of inputs up to 8192 elements (dense there,
    # and tiny); a real layer's codes are larger and stay packed: the last case (16 KiB of codes)
    layers = [(*_layer(bits, g, n, k, bias), g) for bits, g, n, k, bias in CASES + [(4, 64, 128, 256, True)]]
    module = _Layers(layers)
    xs = tuple(_x(2, 3, c[0].shape[2] * 8) for c in layers)
    program = torch.onnx.export(torch.export.export(module, xs, strict=False), (), dynamo=True,
                                custom_translation_table=translations("onnx"), opset_version=ONNX_OPSET,
                                optimize=True, verbose=False)
    model = program.model_proto
    inits = {i.name: i for i in model.graph.initializer}
    packed = [i for i in inits.values() if i.data_type == 2]  # UINT8: the codes, as stored
    assert [tuple(i.dims) for i in packed] == [(4, 128, 32)]
    assert not any(tuple(i.dims) in ((128, 256), (256, 128)) for i in inits.values())  # no dense copy
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})
    for got, x, (codes, scales, bias, g) in zip(outs, xs, layers):
        want = torch.ops.splice.bcq_linear(x, codes, scales, bias, g)
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_fake_refuses_bad_storage():
    codes, scales, _ = _layer(3, 16, 8, 64, False)
    with pytest.raises(Exception, match="scales"):
        torch.library.opcheck(torch.ops.splice.bcq_linear.default, (_x(2, 64), codes, scales[:, :, :2], None, 16),
                              test_utils=("test_faketensor",))
