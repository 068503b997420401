"""quantize.nonuniform and splice::lut_linear: reference numerics, opcheck, ORT parity, SQNR floors."""
import onnx
import pytest
import torch

import splice
from splice.errors import ConfigError
from splice.kernels.quant.lut import lut_dequantize, pack_indices
from splice.passes.quantize.nonuniform import NonUniformConfig, fit_kmeans, fit_layer, power_levels
from zoo_graphs import captured, input_grid


def _lut_storage(bits, n=24, k=96, group=32, lut_groups=1, scaled=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    lut = torch.randn(n, lut_groups, 2 ** bits, generator=gen).sort(-1).values
    scales = torch.rand(n, k // group, generator=gen) + 0.5 if scaled else None
    return idx, pack_indices(idx, bits, group), lut, scales


def _dense(idx, lut, scales, group):
    n, k = idx.shape
    w = torch.stack([lut[r, c // (k // lut.shape[1]), idx[r, c]] for r in range(n) for c in range(k)]).reshape(n, k)
    return w if scales is None else w * scales.repeat_interleave(group, 1)


@pytest.mark.parametrize("bits,lut_groups,scaled", [(2, 1, True), (3, 3, False), (4, 1, False), (8, 3, True)])
def test_lut_linear_matches_dense_reference(bits, lut_groups, scaled):
    idx, q, lut, scales = _lut_storage(bits, lut_groups=lut_groups, scaled=scaled)
    w = _dense(idx, lut, scales, 32)
    torch.testing.assert_close(lut_dequantize(q, lut, scales, bits, 32), w)
    x, bias = torch.randn(2, 5, 96), torch.randn(24)
    torch.testing.assert_close(torch.ops.splice.lut_linear(x, q, lut, scales, bias, bits, 32),
                               torch.nn.functional.linear(x, w, bias))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_linear_opcheck(bits):
    _, q, lut, scales = _lut_storage(bits, lut_groups=3)
    x = torch.randn(3, 96, requires_grad=True)
    torch.library.opcheck(torch.ops.splice.lut_linear.default, (x, q, lut, scales, None, bits, 32))
    torch.library.opcheck(torch.ops.splice.lut_linear.default, (x, q, lut, None, torch.randn(24), bits, 32))


def test_lut_linear_fake_checks_shapes():
    _, q, lut, scales = _lut_storage(3)
    meta = [t.to("meta") for t in (torch.randn(2, 96), q, lut, scales)]
    assert torch.ops.splice.lut_linear(*meta, None, 3, 32).shape == (2, 24)
    with pytest.raises(RuntimeError, match="lut_linear: lut"):
        torch.ops.splice.lut_linear(meta[0], meta[1], meta[2][..., :4], meta[3], None, 3, 32)
    with pytest.raises(RuntimeError, match="lut_linear: input features"):
        torch.ops.splice.lut_linear(meta[0][:, :64], *meta[1:], None, 3, 32)


class _LutModel(torch.nn.Module):
    def __init__(self, bits, lut_groups, scaled):
        super().__init__()
        _, q, lut, scales = _lut_storage(bits, n=512, k=128, lut_groups=lut_groups, scaled=scaled)
        self.register_buffer("q", q)
        self.lut = torch.nn.Parameter(lut, requires_grad=False)
        self.scales = None if scales is None else torch.nn.Parameter(scales, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(512), requires_grad=False)
        self.bits = bits

    def forward(self, x):
        return torch.ops.splice.lut_linear(x, self.q, self.lut, self.scales, self.bias, self.bits, 32)


@pytest.mark.parametrize("bits,lut_groups,scaled", [(2, 1, True), (3, 1, True), (3, 4, False), (4, 1, False)])
def test_lut_linear_ort_parity(bits, lut_groups, scaled, tmp_path):
    m = _LutModel(bits, lut_groups, scaled)
    x = torch.randn(2, 7, 128)
    g = splice.capture(m, (x,))
    path = splice.export_onnx(g, tmp_path / "lut.onnx")
    assert splice.parity(g, path, [(x,), (x[:1, :3],)]) <= 1e-4
    model = onnx.load(path)  # packed: the indices stay uint8, dequantized by GatherElements in the graph
    assert "GatherElements" in [n.op_type for n in model.graph.node]
    packed = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert [list(i.dims) for i in packed] == [list(m.q.shape)]


def _sqnr(w, q):
    return float(10 * torch.log10(w.square().sum() / (w - q).square().sum()))


def _rtn_sqnr(w, bits, group):
    from splice.kernels.quant.grid import GroupGrid

    grid = GroupGrid(bits, group, True)
    scale, zero = grid.params(w)
    return _sqnr(w, grid.dequantize(grid.quantize(w, scale, zero), scale, zero))


@pytest.mark.parametrize("grid,bits", [("power", 3), ("kmeans", 3), ("power", 4), ("kmeans", 2)])
def test_nonuniform_beats_rtn_on_heavy_tailed_weights(grid, bits):
    """Student-t (ν=3) weights: non-uniform grids put levels where the mass is."""
    gen = torch.Generator().manual_seed(0)
    w = _student_t(gen, 64, 256)
    group = 64 if grid == "power" else 256  # power: same scale groups as RTN; kmeans: per channel (SqueezeLLM)
    cfg = NonUniformConfig(bits=bits, grid=grid, group_size=group)
    idx, lut, scales = fit_layer(w, torch.ones(256), cfg, group)
    q = lut_dequantize(pack_indices(idx, bits, group), lut, scales, bits, group)
    rtn = _rtn_sqnr(w, bits, 64)
    assert _sqnr(w, q) > rtn + 1.0, (_sqnr(w, q), rtn)


def _student_t(gen, n, k, nu=3.0):
    z = torch.randn(n, k, generator=gen)
    chi2 = torch.randn(n, k, int(nu), generator=gen).square().sum(-1)
    return z / (chi2 / nu).sqrt()


def test_power_levels_include_uniform_and_ends():
    assert torch.allclose(power_levels(3, 1.0), torch.linspace(-1, 1, 8))
    lv = power_levels(2, 2.0)
    assert lv[0] == -1 and lv[-1] == 1 and torch.all(lv[1:] > lv[:-1])


def test_kmeans_is_exact_on_few_distinct_values():
    vals = torch.tensor([-2.0, -0.5, 0.25, 3.0])
    w = vals[torch.randint(0, 4, (5, 40), generator=torch.Generator().manual_seed(1))]
    idx, centroids = fit_kmeans(w, torch.ones_like(w), 2, 20)
    torch.testing.assert_close(torch.gather(centroids, 1, idx), w)


def test_sensitivity_weighting_lowers_weighted_error():
    gen = torch.Generator().manual_seed(2)
    w = _student_t(gen, 32, 128)
    col = torch.ones(128).index_fill_(0, torch.randperm(128, generator=gen)[:6], 1000.0)  # 6 columns matter most
    cfg = NonUniformConfig(bits=3, grid="kmeans", group_size=0)
    errs = []
    for weight in (torch.ones(128), col):
        idx, lut, _ = fit_layer(w, weight, cfg, 128)
        errs.append(float(((w - torch.gather(lut[:, 0], 1, idx)).square() * col).sum()))
    assert errs[1] < 0.5 * errs[0], errs


@pytest.mark.parametrize("grid", ["power", "kmeans"])
def test_pass_on_llama_with_calibration(grid, tmp_path):
    zm, g = captured("llama")
    calib = [tuple(zm.make_inputs(2, 16, seed=s)[n] for n in g.input_names) for s in range(2)]
    q = g.apply(f"quantize.nonuniform:grid={grid},bits=4", calibration=calib)
    rep = q.history[-1]["report"]
    assert rep["weighting"].startswith("diag") and min(rep["weight_sqnr_db"].values()) > 15
    assert q.op_counts().get("splice.lut_linear") == rep["layers"] and "aten.linear" not in q.op_counts()
    assert q.history[-1]["fidelity"]["logits"]["cosine"] > 0.98
    path = splice.export_onnx(q, tmp_path / "m.onnx")
    assert splice.parity(q, path, input_grid(zm, g)) <= 1e-4


def test_bad_inputs():
    zm, g = captured("llama")
    with pytest.raises(ConfigError, match="quantize.nonuniform: bits must be 2, 3, 4 or 8, got 5"):
        g.apply("quantize.nonuniform:bits=5")
    with pytest.raises(ConfigError, match="grid"):
        g.apply("quantize.nonuniform:grid=lloyd")
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        g.apply("quantize.nonuniform:group_size=48")
    q = g.apply("quantize.nonuniform:targets=q_proj")
    with pytest.raises(ConfigError, match="already quantized"):
        q.apply("quantize.nonuniform:targets=q_proj")
    with pytest.raises(ConfigError, match="already quantized"):
        q.apply("quantize.rtn:targets=q_proj")
