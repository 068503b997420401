"""quantize.smoothquant + quantize.w8a8: the op's arithmetic, opcheck, exact ORT parity on
ORT's integer kernels, SmoothQuant's output-preserving migration, and the bad inputs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import splice
from splice.errors import ConfigError
from splice.kernels.quant.w8a8 import quantize_weight
from splice.passes.quantize.smoothquant import smoothing_scale
from zoo_graphs import assert_error, calibration, captured, input_grid

W8A8 = torch.ops.splice.w8a8_linear.default


def _calib(zm, g, n=2, seq=32):  # 128 tokens: one per input feature of the widest layer
    return calibration(zm, g, n, seq)


def _layer(n=48, k=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    return w, *quantize_weight(w)


def test_opcheck():
    w, q, s = _layer()
    for x, bias in ((torch.randn(3, 64), None), (torch.randn(2, 5, 64), torch.randn(48))):
        torch.library.opcheck(W8A8, (x, q, s, bias))


def test_reference_is_per_token_int8_arithmetic():
    w, q, s = _layer()
    x = torch.randn(7, 64) * torch.logspace(-2, 1, 7)[:, None]  # tokens of very different ranges
    x[3] = 0  # an all-zero token gives the bias
    bias = torch.randn(48)
    xs = x.numpy().astype(np.float64)
    ts = np.maximum(np.abs(xs).max(1, keepdims=True) / 127, 1e-12)
    codes = np.rint(xs / ts)
    want = (codes @ q.numpy().astype(np.float64).T) * s.numpy() * ts + bias.numpy()
    got = torch.ops.splice.w8a8_linear(x, q, s, bias)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[3], bias)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = got - bias - x @ w.T
    assert 10 * torch.log10((x @ w.T).pow(2).sum() / err.pow(2).sum()) > 30  # int8 both sides: > 30 dB


def _ort_ops(path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path) + ".opt.onnx"
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _tokens_off(graph, path, grid) -> tuple[int, float]:
    """Tokens (rows of the first output over ``grid``) whose ORT result differs from the graph's by
    more than 1e-4, and the largest difference."""
    from splice.runtime.onnx import run_session, session

    sess, off, worst = session(path), 0, 0.0
    for inputs in grid:
        ref = next(iter(graph.run(*inputs).values())).float().numpy()
        diff = abs(ref - next(iter(run_session(sess, graph, inputs).values())))
        rows = diff.reshape(-1, diff.shape[-1]).max(-1)
        off, worst = off + int((rows > 1e-4).sum()), max(worst, float(rows.max()))
    return off, worst


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_smoothquant_w8a8_runs_on_ort_integer_kernels_with_parity(name, tmp_path):
    zm, g = captured(name)
    q = g.apply("quantize.smoothquant:alpha=0.5", "quantize.w8a8", calibration=_calib(zm, g))
    n_linear = sum(1 for _ in g.nodes("linear"))
    assert sum(n.target == W8A8 for n in q.gm.graph.nodes) == n_linear
    path = splice.export_onnx(q, tmp_path / "m.onnx")
    off, worst = _tokens_off(q, path, input_grid(zm, g))
    # the int8 arithmetic is ORT's bit for bit; an op ORT fuses before it (GPT-2's LayerNorm) may
    # differ by an ulp and flip one activation's rounding: at most one token's row moves, by a code
    assert off <= 1 and worst <= 1e-2, (off, worst)
    ops = _ort_ops(path)
    assert ops.count("MatMulIntegerToFloat") == n_linear  # every linear on ORT's integer GEMM
    fid = q.history[-1]["fidelity"]
    assert all(v["cosine"] > 0.999 for v in fid.values()), fid


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert", "vit"])
def test_smoothquant_preserves_outputs(name):
    zm, g = captured(name)
    out = g.apply("quantize.smoothquant:alpha=0.8", calibration=_calib(zm, g))
    report = out.history[-1]["report"]
    assert report["smoothed"] and report["scales_folded"] + report["scales_mul"] == len(report["smoothed"])
    for inputs in input_grid(zm, g):
        ref, got = g.run(*inputs), out.run(*inputs)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


def test_smoothquant_folds_into_norms_and_mul_false_skips_the_rest():
    zm, g = captured("llama")
    rep = g.apply("quantize.smoothquant", calibration=_calib(zm, g)).history[-1]["report"]
    sm = rep["smoothed"]
    assert sm["model.layers.0.self_attn.q_proj"]["site"] == "norm:model.layers.0.input_layernorm"
    assert sm["model.layers.0.mlp.gate_proj"]["site"] == "norm:model.layers.0.post_attention_layernorm"
    assert sm["model.layers.0.self_attn.o_proj"]["site"] == "mul"  # GQA: no v -> o fold
    assert "lm_head" in rep["left_alone"]  # tied to the embedding
    assert all(v["outlier_ratio_after"] < v["outlier_ratio_before"] for v in sm.values())
    folded = g.apply("quantize.smoothquant:mul=false", calibration=_calib(zm, g))
    assert "model.layers.0.self_attn.o_proj" not in folded.history[-1]["report"]["smoothed"]
    assert not any("inv_scale" in t for t in folded.tensors())


def test_smoothing_scale_is_the_reference_formula():
    x_max = torch.tensor([1.0, 100.0, 0.0, 4.0])
    w1, w2 = torch.tensor([[0.5, -2.0, 1.0, 0.0]]), torch.tensor([[-1.0, 1.0, 0.5, 0.0]])
    s = smoothing_scale(x_max, [w1, w2], 0.5)
    w_max = torch.tensor([1.0, 2.0, 1.0, 1e-5])
    torch.testing.assert_close(s, (x_max.sqrt() / w_max.sqrt()).clamp(min=1e-5))
    torch.testing.assert_close(smoothing_scale(x_max, [w1], 1.0), x_max.clamp(min=1e-5))


def test_smoothquant_helps_w8a8_with_activation_outliers():
    """Channels scaled by 40 in every RMSNorm (as LLM outlier channels): per-token int8 of the
    norm outputs loses the small channels unless SmoothQuant moves the range into the weights."""
    zm, g = captured("llama")
    g = g.copy()
    for target in [t for t in g.tensors() if t.endswith("layernorm.weight")]:
        w = g.tensor(target).detach().clone()
        w[:3] *= 40
        splice.ir.graph.set_attr(g.gm, target, w)
    calib = _calib(zm, g)
    plain = g.apply("quantize.w8a8").history[-1]["fidelity"]["logits"]["sqnr_db"]
    smooth = g.apply("quantize.smoothquant:alpha=0.5", "quantize.w8a8",
                     calibration=calib).history[-1]["fidelity"]["logits"]["sqnr_db"]
    assert smooth > plain + 3, (smooth, plain)


# ---------------------------------------------------------------------------- bad inputs


def test_bad_options():
    with pytest.raises(ConfigError, match=r"quantize.smoothquant: alpha must be in \[0, 1\], got 1.5"):
        splice.passes.base.get_pass("quantize.smoothquant").make_config({"alpha": "1.5"})
    with pytest.raises(ConfigError, match="quantize.w8a8: bits must be 8"):
        splice.passes.base.get_pass("quantize.w8a8").make_config({"bits": "4"})


@pytest.mark.parametrize("first", ["quantize.rtn", "quantize.w8a8"])
@pytest.mark.parametrize("second", ["quantize.w8a8", "quantize.smoothquant", "quantize.rtn"])
def test_quantized_layers_are_refused(first, second):
    zm, g = captured("llama")
    q = g.apply(first)
    with pytest.raises(ConfigError, match=f"{second}: '.*' is already quantized .*quantize the float model"):
        q.apply(second, calibration=_calib(zm, g))


def test_cli_bad_inputs(capsys, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.smoothquant:alpha=0.5", "-p", "quantize.w8a8",
                          "-o", out], "quantize.smoothquant", "--calib", absent=[out])
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.w8a8:bits=4", "-o", out], "bits must be 8",
                 absent=[out])
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.smoothquant:alpha=-0.1", "-o", out], "alpha",
                 absent=[out])
