"""Calibration infrastructure (observers, sequential runner) and GPTQ's defining property."""
import pytest
import torch

import splice
from splice.ir.segments import SegmentRunner, block_end, blocks
from splice.kernels.observe import StatsStore
from splice.kernels.quant import GroupGrid
from splice.passes.instrument.observe import insert_observers
from splice.passes.quantize.gptq import GPTQConfig, gptq_layer
from zoo_graphs import captured


def _calib(zm, g, n=4, seq=24):
    return [tuple(zm.make_inputs(2, seq, seed=s)[k] for k in g.input_names) for s in range(n)]


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


def test_gptq_without_calibration_is_refused():
    zm, g = captured("cnn")
    with pytest.raises(splice.SpliceError, match="quantize.gptq: needs calibration data"):
        g.apply("quantize.gptq")
