"""lowrank.eora: the compensated model is closer to the float one than the compressed one, after
quantization and after pruning; its output error beats a plain SVD of the error; ONNX Runtime
parity; save/load; one-line errors."""
import pytest
import torch

import splice
from splice.passes.lowrank.eora import eora_factors, output_error
from zoo_graphs import assert_bad_option, assert_one_line_error, calibration, captured, input_grid

CORRECTION = "splice.lowrank_correction"


def _logit_error(g, h, samples):
    return sum(float((h.run(*x)["logits"] - g.run(*x)["logits"]).norm() / g.run(*x)["logits"].norm())
               for x in samples) / len(samples)


@pytest.mark.parametrize(("model", "lossy"), [("llama", "quantize.gptq:bits=3"), ("llama", "prune.magnitude:sparsity=0.5"),
                                              ("qwen2", "quantize.rtn:bits=3,group_size=16")])
def test_eora_lowers_the_error(model, lossy):
    zm, g = captured(model)
    calib, held = calibration(zm, g, n=8, seq=32), calibration(zm, g, n=2, seq=32, seed=100)
    compressed = g.apply(lossy, calibration=calib)
    out = g.apply(lossy, "lowrank.eora:rank=8", calibration=calib)
    report = out.history[-1]["report"]
    assert report["layers"] == out.op_counts()[CORRECTION] > 0
    assert all(v < 1 for v in report["output_error_kept_per_layer"].values())
    assert _logit_error(g, out, held) < _logit_error(g, compressed, held)
    if lossy.startswith("quantize."):  # the quantized weights stay packed
        assert out.op_counts()["splice.qlinear"] == compressed.op_counts()["splice.qlinear"]


def test_eigenspace_beats_plain_svd_on_the_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen) * torch.logspace(0, -2, 32)  # anisotropic inputs
    dw, h = torch.randn(24, 32, generator=gen), x.T @ x
    a, b = eora_factors(dw, h, 4, 0.0)
    u, s, vh = torch.linalg.svd(dw)
    plain = dw - (u[:, :4] * s[:4]) @ vh[:4]
    assert output_error(dw - b @ a, h) < 0.9 * output_error(plain, h)
    a, b = eora_factors(dw, h, 24, 0.0)  # full rank: exact
    torch.testing.assert_close(b @ a, dw, atol=1e-4, rtol=1e-4)


def test_onnx_parity_and_save_load(tmp_path):
    zm, g = captured("llama")
    calib = calibration(zm, g, n=4, seq=32)
    out = g.apply("quantize.gptq:bits=3", "lowrank.eora:rank=4", calibration=calib)
    out.save(tmp_path / "art")
    back = splice.load(tmp_path / "art")
    for x in input_grid(zm, g)[:2]:
        a, b = out.run(*x), back.run(*x)
        assert all(torch.equal(a[k], b[k]) for k in a)
    onnx_path = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, onnx_path, input_grid(zm, g)) <= 1e-4


def test_original_given_by_graph():
    zm, g = captured("llama")
    calib = calibration(zm, g, n=4, seq=32)
    q = g.apply("quantize.rtn:bits=3", calibration=calib)
    out = splice.Pipeline(["lowrank.eora:rank=4"]).run(q, calibration=calib, graphs={"original": g}, probe=False).graph
    assert out.op_counts()[CORRECTION] > 0


def test_bad_inputs_are_one_line_errors():
    assert_one_line_error(["quantize.rtn:bits=3", "lowrank.eora:rank=8"], "lowrank.eora: needs calibration data")
    assert_bad_option("lowrank.eora:rank=0", "lowrank.eora: rank must be >= 1")
    zm, g = captured("llama")
    calib = calibration(zm, g, n=4, seq=32)
    with pytest.raises(splice.errors.ConfigError, match=r"lowrank.eora: rank=1000 exceeds min\(in, out\)") as err:
        g.apply("quantize.rtn:bits=3", "lowrank.eora:rank=1000", calibration=calib)
    assert "\n" not in str(err.value)
    with pytest.raises(splice.errors.ConfigError, match="lowrank.eora: no selected layer differs") as err:
        g.apply("lowrank.eora:rank=4", calibration=calib)  # nothing was compressed
    assert "\n" not in str(err.value)
