"""reparam.shiftadd / reparam.shiftadd_allocate (ShiftAddLLM's BCQ): structure and honest bytes,
exactness with enough bits, the activation-aware mode, power-of-two scales, save/load and ONNX
Runtime parity, the allocation under its budget, and one-line errors for bad inputs."""
import numpy as np
import pytest
import torch

import splice
from splice.ir.metrics import compare_outputs
from splice.ir.select import module_path
from splice.kernels.reparam.bcq import round_pow2
from zoo_graphs import assert_bad_option, assert_one_line_error, calibration, captured, input_grid

BCQ = "splice.bcq_linear"


def _run(specs, model="llama", calib=False):
    zm, g = captured(model)
    data = calibration(zm, g, n=8, seq=64) if calib else None  # 1,024 tokens: 8 per input feature
    return splice.Pipeline(specs).run(g, calibration=data, probe=False).graph


def _params(g):
    return {n.args[1].target: g.tensor(n.args[1].target) for n in g.gm.graph.nodes
            if n.target == torch.ops.aten.linear.default}


def test_every_linear_becomes_bcq_with_honest_bytes():
    _, g = captured("llama")
    weights = _params(g)
    out = _run(["reparam.shiftadd:bits=3,group_size=32"])
    assert out.op_counts().get(BCQ) == len(weights) and "aten.linear.default" not in out.op_counts()
    params = sum(w.numel() for w in weights.values())
    rows_groups = sum(w.shape[0] * w.shape[1] // 32 for w in weights.values())
    roles = out.bytes_by_role()
    assert roles["qweight"] == 3 * params // 8  # 1 bit per sign, 3 planes
    assert roles["scale"] == 3 * rows_groups * 2  # float16 scales per plane, row and group
    report = out.history[-1]["report"]
    assert report["weight_bytes_after"] == roles["qweight"] + roles["scale"]
    assert report["bits_per_weight"] == pytest.approx(3 + 3 * 16 / 32)


def test_enough_bits_reproduce_the_model():
    """8 planes on groups of 8 weights, float32 scales: every layer exactly (Hadamard planes)."""
    zm, g = captured("llama")
    out = _run(["reparam.shiftadd:bits=8,group_size=8,scale_dtype=float32"])
    for inputs in input_grid(zm, g)[:2]:
        a, b = g.run(*inputs), out.run(*inputs)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_activation_aware_fit_lowers_the_output_error():
    zm, g = captured("llama")
    plain = _run(["reparam.shiftadd:bits=2"])
    aware = _run(["reparam.shiftadd:bits=2,calib=true"], calib=True)
    samples = calibration(zm, g, n=2, seed=10)  # unseen text
    err = [sum(float((g.run(*s)["logits"] - q.run(*s)["logits"]).square().mean()) for s in samples) for q in (plain, aware)]
    assert err[1] < err[0]
    assert aware.history[-1]["report"]["activation_aware"] is True


def test_pow2_scales_are_powers_of_two():
    out = _run(["reparam.shiftadd:bits=2,pow2=true"])
    scales = [t for k, t in out.tensors().items() if k.endswith("bcq_scales")]
    assert scales and all(torch.equal(round_pow2(s.float()), s.float()) for s in scales)


def test_save_load_bit_identical_and_onnx_parity(tmp_path):
    zm, g = captured("gpt2")
    out = _run(["reparam.shiftadd:bits=3,group_size=32,targets=*mlp*|*attn*"], model="gpt2")
    out.save(tmp_path / "art")
    back = splice.load(tmp_path / "art")
    grid = input_grid(zm, g)
    for inputs in grid[:2]:
        a, b = out.run(*inputs), back.run(*inputs)
        assert all(torch.equal(a[k], b[k]) for k in a)
    path = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, path, grid) <= 1e-4


def test_allocate_meets_the_budget_and_spends_bits_where_they_matter():
    zm, g = captured("llama")
    out = _run(["reparam.shiftadd_allocate:avg_bits=2.5,bits=2,3,4,iters=2"], calib=True)
    report = out.history[-1]["report"]
    assert report["avg_bits"] <= 2.5 + 1e-9 and set(report["plan"].values()) <= {2, 3, 4}
    assert len(set(report["plan"].values())) > 1
    for node in out.gm.graph.nodes:
        if node.target == torch.ops.splice.bcq_linear.default:
            assert out.tensor(node.args[1].target).shape[0] == report["plan"][module_path(node)]
    # against uniform 2-bit: the allocation at a larger budget has lower output error
    uniform = _run(["reparam.shiftadd:bits=2,iters=2"])
    samples = calibration(zm, g, n=2, seed=10)
    err = [sum(float((g.run(*s)["logits"] - q.run(*s)["logits"]).square().mean()) for s in samples) for q in (uniform, out)]
    assert err[1] < err[0]
    fid = compare_outputs(g.run(*g.example_inputs), out.run(*g.example_inputs))
    assert np.all([f["cosine"] > 0.9 for f in fid.values()])


@pytest.mark.parametrize("spec,message", [
    ("reparam.shiftadd:bits=0", r"^reparam\.shiftadd: bits must be 1\.\.8 .*got 0"),
    ("reparam.shiftadd:bits=9", r"^reparam\.shiftadd: bits must be 1\.\.8 .*got 9"),
    ("reparam.shiftadd:group_size=12", r"^reparam\.shiftadd: group_size must be a positive multiple of 8"),
    ("reparam.shiftadd_allocate:avg_bits=1.5,bits=2,3", r"^reparam\.shiftadd_allocate: avg_bits 1\.5 is below the minimum achievable 2"),
    ("reparam.shiftadd_allocate:bits=2,9", r"^reparam\.shiftadd_allocate: bits candidates must be 1\.\.8"),
])
def test_bad_options_are_one_line_errors(spec, message):
    assert_bad_option(spec, message)


def test_group_size_not_dividing_in_features_names_the_layer():
    assert_one_line_error(["reparam.shiftadd:group_size=48"],
                          r"^reparam\.shiftadd: group_size 48 does not divide in_features 64 of 'model\.layers\.0\.self_attn\.q_proj'")


def test_already_rewritten_layers_are_refused():
    _, g = captured("llama")
    once = splice.Pipeline(["reparam.shiftadd"]).run(g, probe=False).graph
    with pytest.raises(splice.errors.ConfigError, match=r"^reparam\.shiftadd: '.*' is already rewritten \(by reparam\.shiftadd\)"):
        splice.Pipeline(["reparam.shiftadd"]).run(once, probe=False)
    with pytest.raises(splice.errors.ConfigError, match=r"^quantize\.rtn: '.*' is already quantized \(by reparam\.shiftadd\)"):
        splice.Pipeline(["quantize.rtn"]).run(once, probe=False)
