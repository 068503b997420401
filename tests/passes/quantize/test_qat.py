"""quantize.qat / quantize.convert: the fake-quant op (forward = RTN's grid, STE/LSQ gradients,
opcheck), training lowers the loss and moves the scales, convert is output-exact, ONNX parity
after training, oscillation dampening / freezing, and the bad inputs (one-line errors, CLI).

Tiny zoo llama, byte tokenizer, one torch thread (see tests/train/test_train.py).
"""
import pytest
import torch
from zoo_graphs import assert_error, captured, input_grid

import splice
from splice.errors import ConfigError
from splice.eval.data import ByteTokenizer, builtin_text
from splice.kernels.quant.grid import GroupGrid
from splice.passes.quantize._oscillation import _Layer, oscillation_hook

FQL = torch.ops.splice.fake_quant_linear.default
TEXT = builtin_text("gpl3")
FAST = dict(seq_len=64, batch_size=4, tokenizer=ByteTokenizer(), progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama():
    return captured("llama")


@pytest.fixture(scope="module")
def trained(llama):
    qat = llama[1].apply("quantize.qat:bits=2,group_size=16,symmetric=false")
    out, report = splice.train(qat, [TEXT[:20000]], eval_data=[TEXT[20000:26000]], steps=30, lr=5e-3, **FAST)
    return qat, out, report


def _op_args(bits, symmetric, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 64, generator=gen)
    grid = GroupGrid(bits, 16, symmetric)
    s, z = grid.params(w)
    x = torch.randn(3, 5, 64, generator=gen)
    b = torch.randn(8, generator=gen) if bias else None
    return grid, z, (x, w, s, grid.pack_zeros(z), b, bits, 16)


# ----------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("bits,symmetric,bias", [(2, False, True), (4, True, False), (8, False, True)])
def test_op_forward_is_rtn_grid_and_opcheck(bits, symmetric, bias):
    grid, z, args = _op_args(bits, symmetric, bias)
    x, w, s, _, b, *_ = args
    want = torch.nn.functional.linear(x, grid.dequantize(grid.quantize(w, s, z), s, z), b)
    assert torch.equal(FQL(*args), want)
    grad_args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                      for a in args)
    torch.library.opcheck(FQL, grad_args)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradients_are_ste_and_lsq(symmetric):
    """The op's gradients equal autograd through LSQ's formula: round with a straight-through
    estimator, clamp's own gradient (zero outside the grid), then ``(c - z) * s``."""
    grid, z, args = _op_args(3, symmetric)
    x, w, s, zp, b, bits, g = args
    w = w * 1.3  # push some weights past the grid's ends: clamped codes
    leaves = [t.clone().requires_grad_() for t in (x, w, s, b)]
    FQL(leaves[0], leaves[1], leaves[2], zp, leaves[3], bits, g).pow(2).sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, w, s, b)]
    srep, zrep = ref[2].repeat_interleave(g, 1), z.repeat_interleave(g, 1).float()
    v = ref[1] / srep
    c = torch.clamp(v + (torch.round(v) - v).detach() + zrep, 0, grid.maxq)
    torch.nn.functional.linear(ref[0], (c - zrep) * srep, ref[3]).pow(2).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-4)
    assert (leaves[1].grad == 0).any() and leaves[2].grad.abs().sum() > 0


# --------------------------------------------------------------------------------- the pass


def test_qat_init_equals_rtn_and_only_latent_tensors_train(llama):
    zm, graph = llama
    for opts in ("bits=2,group_size=16,symmetric=false", "bits=4,group_size=32"):
        qat = graph.apply("quantize.qat:" + opts)
        rtn = graph.apply("quantize.rtn:" + opts)
        for inputs in input_grid(zm, graph)[:2]:
            a, b = qat.run(*inputs), rtn.run(*inputs)
            assert all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)
    trainable = {t for t, v in qat.tensors().items() if v.requires_grad}
    assert trainable and all(t.endswith((".qat_weight", ".qat_scales")) for t in trainable)
    assert qat.op_counts().get("splice.fake_quant_linear") == sum(1 for _ in graph.nodes("linear"))
    assert not any(v.requires_grad for v in graph.tensors().values())  # the input graph is untouched


def test_training_lowers_loss_and_learns_scales(trained):
    qat, out, report = trained
    assert report["eval_loss_after"] < report["eval_loss_before"] - 0.1, report
    moved = [t for t in qat.tensors() if t.endswith(".qat_scales")
             and not torch.equal(qat.tensor(t), out.tensor(t))]
    assert moved, "no scale was trained"


def test_convert_is_exact_and_exports(trained, llama, tmp_path):
    zm, graph = llama
    _, out, _ = trained
    conv = out.apply("quantize.convert")
    assert "splice.fake_quant_linear" not in conv.op_counts()
    assert conv.op_counts()["splice.qlinear"] == out.op_counts()["splice.fake_quant_linear"]
    assert not any(t.endswith(".qat_weight") for t in conv.tensors())
    grid = input_grid(zm, graph)
    for inputs in grid:
        a, b = out.run(*inputs), conv.run(*inputs)
        assert all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)
    assert splice.parity(out, splice.export_onnx(out, tmp_path / "qat.onnx"), grid[:2]) <= 1e-4  # learned scales


# -------------------------------------------------------------------------------- oscillations


def test_dampening_pulls_weights_to_grid_points(llama):
    graph = llama[1]

    def distance(g):  # the regularizer's own measure: mean squared distance to the grid points, in steps
        with torch.no_grad():
            return float(torch.stack([_Layer(g, n).dampening() for n in g.nodes("linear")]).mean())

    runs = {}
    for dampen in (0.0, 20.0):
        qat = graph.apply(f"quantize.qat:bits=2,group_size=16,dampen={dampen}")
        out, report = splice.train(qat, [TEXT[:8000]], steps=15, lr=1e-3, **FAST)
        runs[dampen] = distance(out), report["history"][-1]
    assert runs[20.0][0] < 0.5 * runs[0.0][0], runs
    assert runs[20.0][1]["regularizer"] > 0


def test_freezing_stops_an_oscillating_weight(llama):
    qat = llama[1].apply("quantize.qat:bits=2,group_size=16,freeze_threshold=0.015")
    hook = oscillation_hook(qat)
    layer = hook.layers[0]
    w = layer.weight
    step = layer.scales.detach()[0, 0].abs()
    start = w.detach()[0, 0].clone()
    for i in range(4):  # the weight crosses a rounding boundary back and forth
        with torch.no_grad():
            w[0, 0] = start + (step if i % 2 == 0 else 0)
        hook.after_step(i, 10)
    assert bool(layer.frozen[0, 0]) and layer.frozen.sum() == 1
    frozen_at = float(w.detach()[0, 0])
    with torch.no_grad():
        w[0, 0] += 5 * step
    w.grad = torch.ones_like(w)
    hook.after_backward(4, 10)
    hook.after_step(4, 10)
    assert w.grad[0, 0] == 0 and float(w.detach()[0, 0]) == frozen_at
    assert oscillation_hook(llama[1].apply("quantize.qat:bits=2,group_size=16")) is None  # options off: no hook


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("spec,needle", [("quantize.qat:bits=1", "bits must be 2..8"),
                                         ("quantize.qat:dampen=-1", "dampen must be >= 0"),
                                         ("quantize.qat:freeze_threshold=1", "freeze_threshold must be in [0, 1)")])
def test_config_errors(llama, spec, needle):
    with pytest.raises(ConfigError, match="quantize.qat: " + needle.replace("[", r"\[").replace(")", r"\)")):
        llama[1].apply(spec)


def test_convert_without_qat_and_quantizing_twice(llama):
    graph = llama[1]
    with pytest.raises(ConfigError, match="^quantize.convert: requires quantize.qat earlier in the pipeline"):
        graph.apply("quantize.convert")  # the Pipeline's requires check names both passes
    with pytest.raises(ConfigError, match="^quantize.convert: no QAT layers in the graph .after quantize.qat, quantize.convert.$"):
        graph.apply("quantize.qat", "quantize.convert", "quantize.convert")  # qat ran, but nothing left to convert
    with pytest.raises(ConfigError, match="quantize.qat: .* is already quantized"):
        graph.apply("quantize.rtn", "quantize.qat")
    with pytest.raises(ConfigError, match="quantize.rtn: .* is already quantized .by quantize.qat"):
        graph.apply("quantize.qat", "quantize.rtn")


def test_cli_convert_without_qat(capsys, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.convert", "-o", out],
                 "quantize.convert: requires quantize.qat earlier in the pipeline", absent=[out])
