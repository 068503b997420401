"""Calibration infrastructure (observers, sequential runner) and GPTQ's defining property."""
import pytest
import torch

import splice
from splice.ir.graph import set_attr
from splice.ir.segments import SegmentRunner, block_end, blocks
from splice.kernels.instrument.store import StatsStore
from splice.kernels.quant.grid import GroupGrid
from splice.passes.instrument.observe import insert_observers
from splice.passes.quantize.gptq import GPTQConfig, gptq_layer
from zoo_graphs import calibration, captured, unlike_samples


_calib = calibration


def test_observer_hessian_matches_layer_inputs():
    zm, g = captured("llama")
    work = g.copy()
    node = next(n for n in work.nodes("linear") if "down_proj" in str(n.meta["nn_module_stack"]))
    keys = insert_observers(work, [node])
    store = StatsStore({keys[node]: ("hessian", "act")})
    seen = []
    handle = zm.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    sample = g.example_inputs
    with store.recording(), torch.no_grad():
        work.gm(*sample)
        zm.model(**dict(zip(g.input_names, sample)))
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    stats = store.pop(keys[node])
    torch.testing.assert_close(stats.hessian(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.abs_max, x.abs().amax(0))


def test_segment_runner_matches_full_forward():
    zm, g = captured("qwen2")
    samples = _calib(zm, g, n=2)
    runner = SegmentRunner(g.gm, samples)
    for block in blocks(g.gm, list(g.nodes("linear"))):
        runner.run_to(block_end(g.gm, block))
        assert len(runner.envs[0]) < len(runner.nodes) // 2  # dead values are freed
    runner.run_to(len(runner.nodes) - 1)
    out = next(n for n in g.gm.graph.nodes if n.op == "output").args[0][0]
    for env, sample in zip(runner.envs, samples):
        torch.testing.assert_close(env[out], g.run(*sample)["logits"])


def test_segment_runner_runs_later_blocks_on_weights_changed_mid_run():
    """Sequential calibration changes a block's weights after the run started (get_attr
    values were fetched at the top of the graph): later segments must use the new ones."""
    zm, g = captured("llama")
    work = g.copy()
    samples = _calib(zm, work, n=1)
    runner = SegmentRunner(work.gm, samples)
    by_block = blocks(work.gm, list(work.nodes("linear")))
    first, second = list(by_block)[:2]
    runner.run_to(block_end(work.gm, first))
    target = by_block[second][-1].args[1].target  # the second block's down_proj
    set_attr(work.gm, target, torch.zeros_like(work.tensor(target)))
    runner.run_to(len(runner.nodes) - 1)
    out = next(n for n in work.gm.graph.nodes if n.op == "output").args[0][0]
    torch.testing.assert_close(runner.envs[0][out], work.run(*samples[0])["logits"])
    assert not torch.allclose(runner.envs[0][out], g.run(*samples[0])["logits"])


def test_gptq_reduces_layer_output_error_against_rtn():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    grid = GroupGrid(3, 32, False)
    s, z = grid.params(w)
    rtn = grid.dequantize(grid.quantize(w, s, z), s, z)
    for act_order in (False, True):
        codes, scale, zero, _ = gptq_layer(w, h, grid, GPTQConfig(bits=3, act_order=act_order))
        q = grid.dequantize(codes, scale, zero)
        assert (x @ (q - w).T).pow(2).mean() < 0.7 * (x @ (rtn - w).T).pow(2).mean()


def test_gptq_damps_singular_hessians_without_nan():
    w = torch.randn(16, 64)
    x = torch.randn(100, 1) * torch.ones(1, 64)  # rank-1 inputs; a channel never active
    x[:, 5] = 0
    codes, scale, zero, retries = gptq_layer(w, 2 * x.T @ x / 100, GroupGrid(4, 32, True), GPTQConfig())
    assert torch.isfinite(scale).all() and codes.min() >= 0 and codes.max() <= 15


def test_gptq_pass_beats_rtn_on_model_outputs():
    zm, g = captured("gpt2")
    calib, test = _calib(zm, g, n=8), _calib(zm, g, n=1, seq=32)[0]
    ref = g.run(*test)["logits"]
    err = {}
    for spec in ("quantize.rtn:bits=3", "quantize.gptq:bits=3", "quantize.gptq:bits=3,sequential=false"):
        q = g.apply(spec, calibration=calib)
        err[spec] = (q.run(*test)["logits"] - ref).pow(2).mean()
    assert err["quantize.gptq:bits=3"] < err["quantize.rtn:bits=3"]
    assert err["quantize.gptq:bits=3,sequential=false"] < err["quantize.rtn:bits=3"]
    assert q.history[-1]["report"]["calibration_samples"] == 8


def test_gptaq_fits_quantized_inputs_to_float_outputs():
    """GPTAQ's objective ‖W X − Q X̃‖ (X̃: the inputs a quantized model feeds the layer): its
    closed-form correction (α = 1) beats the paper's damped default, which beats plain GPTQ."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(1024, 64, generator=gen) @ (torch.randn(64, 64, generator=gen) / 8 + torch.eye(64))
    xq = x @ (torch.eye(64) + 0.2 * torch.randn(64, 64, generator=gen) / 8)  # upstream quantization's distortion
    h, dxtx = 2 * xq.T @ xq / 1024, 2 * (x - xq).T @ xq / 1024
    grid = GroupGrid(4, 16, True)
    err = {}
    for alpha, asym in ((None, None), (0.25, dxtx), (1.0, dxtx)):
        cfg = GPTQConfig(bits=4, group_size=16, gptaq=asym is not None, gptaq_alpha=alpha or 0.25)
        q = grid.dequantize(*gptq_layer(w, h, grid, cfg, asym)[:3])
        err[alpha] = float((x @ w.T - xq @ q.T).pow(2).mean())
    assert err[1.0] < 0.6 * err[None] and err[0.25] < 0.9 * err[None]
    # with no asymmetry it is GPTQ exactly
    plain = gptq_layer(w, h, grid, GPTQConfig(bits=4, group_size=16))
    zero = gptq_layer(w, h, grid, GPTQConfig(bits=4, group_size=16, gptaq=True), torch.zeros_like(h))
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], zero[:3]))


def test_gptaq_pass_gathers_float_reference_inputs():
    zm, g = captured("llama")
    calib, test = _calib(zm, g, n=4), _calib(zm, g, n=1, seq=32)[0]
    q = g.apply("quantize.gptq:bits=3,gptaq=true", calibration=calib)
    cos = torch.nn.functional.cosine_similarity(q.run(*test)["logits"].flatten(), g.run(*test)["logits"].flatten(), 0)
    assert cos > 0.95 and q.history[-1]["config"]["gptaq"] is True
    with pytest.raises(splice.SpliceError, match="quantize.gptq: gptaq needs sequential=true"):
        g.apply("quantize.gptq:gptaq=true,sequential=false", calibration=calib)


def test_float_reference_runs_in_step_with_the_working_copy():
    """Sequential ``asym`` statistics pair each observer call with the float model's matching
    call: while no layer changes, the quantized and float inputs agree, so ΔXᵀX̃ is 0; once a
    block's weights change, later blocks see a difference."""
    from splice.passes.instrument.calibrate import solve_groups

    zm, g = captured("llama")
    nodes = list(g.nodes("linear"))
    for change in (False, True):
        seen = {}

        def solve(members, weights, stats, change=change):
            seen[members[0].name] = float(stats.asymmetry().abs().max())
            return [w * 0.9 if change else w for w in weights]

        solve_groups(g, nodes, _calib(zm, g, n=2), ("hessian", "asym"), solve, sequential=True, pass_name="t")
        values = list(seen.values())
        assert len(values) > 4 and values[0] == 0
        assert (max(values[1:]) > 0) == change


def test_mse_clipping_lowers_each_groups_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.rand(32, 128).pow(4) * 3  # heavy-tailed groups: clipping pays
    for symmetric in (True, False):
        grid = GroupGrid(3, 32, symmetric)
        errors = {}
        for name, (s, z) in {"minmax": grid.params(w), "mse": grid.mse_params(w)}.items():
            deq = grid.dequantize(grid.quantize(w, s, z), s, z)
            errors[name] = (w - deq).abs().pow(2.4).reshape(32, 4, 32).sum(-1)
        assert (errors["mse"] <= errors["minmax"] + 1e-6).all()
        assert errors["mse"].sum() < 0.95 * errors["minmax"].sum()


def test_ledoit_wolf_shrinkage_grows_as_rows_get_fewer():
    torch.manual_seed(0)
    mix = torch.randn(64, 64)
    rho = {}
    for rows in (64, 512, 8192):
        store = StatsStore({"x": ("hessian",)})
        with store.recording():
            store.update("x", torch.randn(rows, 64) @ mix)
        rho[rows] = store.stats["x"].shrinkage()
    assert 1 >= rho[64] > rho[512] > rho[8192] >= 0
    assert rho[8192] < 0.05


def test_gptq_reports_the_damping_of_every_layer():
    zm, g = captured("llama")
    few, many = _calib(zm, g, n=2, seq=40), _calib(zm, g, n=16, seq=64)
    damp = {}
    for name, calib in (("few", few), ("many", many)):
        rep = g.apply("quantize.gptq:bits=4", calibration=calib).history[-1]["report"]
        assert set(rep["damp"]) == set(rep["weight_sqnr_db"])  # every layer it solved
        assert all(0.01 <= d <= 1 for d in rep["damp"].values())
        damp[name] = rep["damp_mean"]
    assert damp["few"] > damp["many"]  # fewer rows per feature: more shrinkage toward the diagonal
    fixed = g.apply("quantize.gptq:bits=4,damp_auto=false", calibration=few).history[-1]["report"]
    assert set(fixed["damp"].values()) == {0.01}


def test_hessian_mix_blends_the_float_models_inputs():
    zm, g = captured("llama")
    calib = _calib(zm, g, n=4, seq=32)
    out = {mix: g.apply(f"quantize.gptq:bits=3,hessian_mix={mix}", calibration=calib) for mix in (0, 0.5, 1)}
    codes = {mix: q.tensor("model.layers.1.mlp.down_proj.qweight") for mix, q in out.items()}
    assert not torch.equal(codes[0], codes[0.5]) and not torch.equal(codes[0.5], codes[1])
    # the first block's inputs are the embeddings, the same in both models: no difference there
    first = {mix: q.tensor("model.layers.0.self_attn.q_proj.qweight") for mix, q in out.items()}
    assert torch.equal(first[0], first[1])
    with pytest.raises(splice.SpliceError, match="hessian_mix needs sequential=true"):
        g.apply("quantize.gptq:hessian_mix=0.5,sequential=false", calibration=calib)


@pytest.mark.parametrize("spec, key", [("quantize.gptq:bits=3", "kept_rtn"), ("quantize.awq:bits=3", "held_back")])
def test_held_out_samples_overrule_a_fit_to_unlike_samples(spec, key):
    zm, g = captured("llama")
    fit_to_one_token = g.apply(spec, calibration=unlike_samples(zm, g)).history[-1]["report"][key]
    assert len(fit_to_one_token) >= 10  # layers whose fit loses to round-to-nearest on the random samples
    assert not g.apply(f"{spec},holdout=0", calibration=unlike_samples(zm, g)).history[-1]["report"][key]
    alike = g.apply(spec, calibration=_calib(zm, g, n=16, seq=32)).history[-1]["report"][key]
    assert len(alike) <= 2  # samples like the fit's: the fit stands (nearly) everywhere


def test_version_1_entries_keep_what_they_ran():
    from splice.passes.base import get_pass, migrate_entry

    old = {"pass": "quantize.gptq", "version": 1, "config": {"bits": 3, "act_order": False}}
    new = migrate_entry(get_pass("quantize.gptq"), old)
    assert new["version"] == 2 and new["config"] == {"bits": 3, "act_order": False, "damp_auto": False,
                                                     "clip": "minmax", "holdout": 0.0, "hessian_mix": 0.0}
    for name in ("quantize.awq", "quantize.reconstruct", "quantize.discquant"):
        entry = migrate_entry(get_pass(name), {"pass": name, "version": 1, "config": {"holdout": 0.5}})
        assert entry["version"] == 2 and entry["config"] == {"holdout": 0.5}  # an explicit value stays
        assert migrate_entry(get_pass(name), {"pass": name, "version": 1, "config": {}})["config"] == {"holdout": 0.0}


@pytest.mark.parametrize("spec, needle", [
    ("quantize.gptq:clip=max", "clip must be one of minmax, mse"),
    ("quantize.gptq:holdout=1", "holdout must be in [0, 1)"),
    ("quantize.gptq:hessian_mix=2", "hessian_mix must be in [0, 1]"),
    ("quantize.awq:holdout=-0.1", "holdout must be in [0, 1)"),
    ("quantize.reconstruct:holdout=1.5", "holdout must be in [0, 1)"),
    ("quantize.discquant:holdout=1", "holdout must be in [0, 1)"),
])
def test_new_options_reject_bad_values_in_one_line(spec, needle):
    with pytest.raises(splice.SpliceError) as e:
        splice.Pipeline([spec])
    assert spec.split(":")[0] in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
