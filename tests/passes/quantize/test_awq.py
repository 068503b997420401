"""quantize.awq: the scale migration is exact, folds land where they are exact, the search
beats round-to-nearest, and the result exports to ONNX Runtime."""
import pytest
import torch

import splice
from splice.errors import ConfigError
from splice.ir.select import module_path
from splice.kernels.quant.grid import GroupGrid
from splice.passes.base import get_pass
from splice.passes.quantize._smooth import input_groups, migrate_scales
from splice.passes.quantize.awq import _fake_quant, search_clip, search_scale
from zoo_graphs import calibration, captured, input_grid

aten = torch.ops.aten


_calib = calibration


def _migrated(name, seed=0):
    """The zoo graph with random positive scales migrated into every group of linears."""
    zm, g = captured(name)
    work = g.copy()
    groups = input_groups(list(work.nodes("linear")))
    gen = torch.Generator().manual_seed(seed)
    scales = [torch.exp(torch.randn(m[0].args[0].meta["val"].shape[-1], generator=gen)) for m in groups]
    sites = migrate_scales(work, groups, scales, tag="awq")
    return zm, g, work.finalize(), {module_path(m[0]): site for m, site in zip(groups, sites)}


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert", "vit", "cnn"])
def test_scale_migration_preserves_outputs(name):
    zm, g, work, sites = _migrated(name)
    assert any(site != "mul" for site in sites.values()) == (name != "cnn")  # the CNN's fc reads a mean
    for inputs in input_grid(zm, g):
        ref, got = g.run(*inputs), work.run(*inputs)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


def test_folds_rmsnorm_and_up_proj_for_llama():
    zm, g, work, sites = _migrated("llama")
    layer = "model.layers.0"
    assert sites[f"{layer}.self_attn.q_proj"] == f"norm:{layer}.input_layernorm"
    assert sites[f"{layer}.mlp.gate_proj"] == f"norm:{layer}.post_attention_layernorm"
    assert sites[f"{layer}.mlp.down_proj"] == f"linear:{layer}.mlp.up_proj"  # through silu(gate) * up
    assert sites[f"{layer}.self_attn.o_proj"] == "mul"  # GQA: value heads are shared, no v -> o fold
    assert sites["lm_head"] == "tied"  # its weight is also the embedding table: left unscaled
    assert _migrated("qwen2")[3]["lm_head"] == "norm:model.norm"  # untied: through the logits slices
    # folded tensors are new; the captured graph's tensors are untouched
    before, after = g.tensor(f"{layer}.input_layernorm.weight"), work.tensor(f"{layer}.input_layernorm.weight")
    assert after is not before and not torch.equal(after, before)
    assert torch.equal(before, zm.model.model.layers[0].input_layernorm.weight)
    muls = [n for n in work.gm.graph.nodes if n.target == aten.mul.Tensor
             and getattr(n.args[1], "op", "") == "get_attr" and n.args[1].target.endswith("awq_inv_scale")]
    assert len(muls) == 2  # one per o_proj


def test_folds_layernorm_and_value_for_gpt2():
    sites = _migrated("gpt2")[3]
    assert sites["transformer.h.0.attn.c_attn"] == "layer_norm:transformer.h.0.ln_1"  # through a view
    assert sites["transformer.h.0.mlp.c_fc"] == "layer_norm:transformer.h.0.ln_2"
    # value rows 128..191 of the fused c_attn, through split and attention
    assert sites["transformer.h.0.attn.c_proj"] == "linear:transformer.h.0.attn.c_attn"
    assert sites["transformer.h.0.mlp.c_proj"] == "mul"  # GELU is not homogeneous


def test_bert_layernorm_read_by_the_residual_is_not_folded():
    _, _, _, sites = _migrated("bert")
    # post-LN: every LayerNorm output also feeds a residual add (or is a model output)
    assert sites["encoder.layer.0.attention.self.query"] == "mul"
    assert sites["encoder.layer.0.intermediate.dense"] == "mul"
    assert sites["pooler.dense"] == "mul"
    assert sites["encoder.layer.0.attention.output.dense"] == "linear:encoder.layer.0.attention.self.value"


def test_shared_norm_weight_is_not_folded():
    _, g = captured("llama")
    work = g.copy()
    norm = {n.args[0].target: n for n in work.gm.graph.nodes
            if n.target == aten.mul.Tensor and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"}
    first, second = norm["model.layers.0.input_layernorm.weight"], norm["model.layers.1.input_layernorm.weight"]
    second.replace_input_with(second.args[0], first.args[0])  # both layers read one norm weight
    work.finalize()
    shared_ref = work.run(*g.example_inputs)["logits"]
    groups = input_groups(list(work.nodes("linear")))
    scales = [torch.linspace(0.5, 2.0, m[0].args[0].meta["val"].shape[-1]) for m in groups]
    sites = migrate_scales(work, groups, scales, tag="awq")
    by_path = {module_path(m[0]): site for m, site in zip(groups, sites)}
    assert by_path["model.layers.0.self_attn.q_proj"] == by_path["model.layers.1.self_attn.q_proj"] == "mul"
    torch.testing.assert_close(work.finalize().run(*g.example_inputs)["logits"], shared_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_matches_the_stored_grid(symmetric):
    w = torch.randn(48, 96) * torch.linspace(0.01, 3, 96)
    grid = GroupGrid(3, 32, symmetric)
    scale, zero = grid.params(w)
    assert torch.equal(_fake_quant(w, grid), grid.dequantize(grid.quantize(w, scale, zero), scale, zero))


def test_search_scale_and_clip_beat_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(4096, 128)
    x[:, :4] *= 20  # a few salient input channels, as in LLM activations
    h = 2 * x.T @ x / x.shape[0]
    grid = GroupGrid(3, 32, False)

    def err(q):
        return float(((q - w) @ h * (q - w)).sum())

    s0, z0 = grid.params(w)
    rtn = err(grid.dequantize(grid.quantize(w, s0, z0), s0, z0))
    alpha, s, rtn_rows, scaled_rows = search_scale(w, x.abs().mean(0), h, grid, 20, duo=False)
    assert alpha > 0 and s[:4].min() > s[4:].max()  # salient channels are scaled up
    ws = w * s
    sc, zc = grid.params(ws)
    scaled = err(grid.dequantize(grid.quantize(ws, sc, zc), sc, zc) / s)
    assert scaled < 0.8 * rtn
    torch.testing.assert_close(torch.tensor([rtn_rows.sum(), scaled_rows.sum()]), torch.tensor([rtn, scaled]))
    clipped, ratio = search_clip(ws, h / torch.outer(s, s), grid)
    assert 0.5 < ratio < 1
    sc, zc = grid.params(clipped)
    assert err(grid.dequantize(grid.quantize(clipped, sc, zc), sc, zc) / s) < scaled


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit"])
def test_awq_at_8_bits_is_as_close_as_rtn(name):
    """Folds into quantized producers (up_proj, c_attn's value rows, v_proj) and inserted Muls
    keep the function: at 8 bits only rounding noise remains, as with round-to-nearest."""
    zm, g = captured(name)
    test = _calib(zm, g, n=1, seq=16)[0]
    ref = g.run(*test)
    err = {}
    for spec in ("quantize.rtn:bits=8,symmetric=false", "quantize.awq:bits=8"):
        out = g.apply(spec, calibration=_calib(zm, g)).run(*test)
        err[spec] = max(float((out[k] - ref[k]).abs().max()) for k in ref)
    assert err["quantize.awq:bits=8"] < 2 * err["quantize.rtn:bits=8,symmetric=false"] < 0.02


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_awq_beats_rtn_on_model_outputs(name):
    zm, g = captured(name)
    calib, test = _calib(zm, g, n=8), _calib(zm, g, n=1, seq=32)[0]
    ref = g.run(*test)["logits"]
    err = {}
    for spec in ("quantize.rtn:bits=3,symmetric=false", "quantize.awq:bits=3", "quantize.awq:bits=3,sequential=false"):
        q = g.apply(spec, calibration=calib)
        err[spec] = float((q.run(*test)["logits"] - ref).pow(2).mean())
        if "awq" in spec:
            report = q.history[-1]["report"]
            assert report["mean_err_awq"] < report["mean_err_rtn"]
            assert report["scales_folded"] > 0 and report["calibration_samples"] == 8
    assert err["quantize.awq:bits=3"] < err["quantize.rtn:bits=3,symmetric=false"]
    assert err["quantize.awq:bits=3,sequential=false"] < err["quantize.rtn:bits=3,symmetric=false"]


def test_awq_onnx_parity(tmp_path):
    zm, g = captured("llama")  # folded norms, a folded up_proj and inserted Muls
    q = g.apply("quantize.awq:bits=4", calibration=_calib(zm, g))
    assert q.history[-1]["report"]["scales_mul"] > 0 and q.history[-1]["report"]["scales_folded"] > 0
    assert splice.parity(q, splice.export_onnx(q, tmp_path / "m.onnx"), input_grid(zm, g)) <= 1e-4


def test_awq_config_and_calibration_errors():
    info = get_pass("quantize.awq")
    cfg = info.make_config({})
    assert not cfg.symmetric and cfg.grid == 20 and cfg.clip and cfg.sequential
    with pytest.raises(ConfigError, match="quantize.awq: grid must be >= 1"):
        info.make_config({"grid": 0})
