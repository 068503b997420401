"""quantize.allocate: the milp plan against brute force, budgets, the plan in the graph and the
artifact, and bad inputs (Python API and CLI)."""
import itertools
import json

import numpy as np
import pytest
import torch

import splice
from splice.errors import ConfigError
from splice.ir.select import module_path
from splice.passes.quantize.allocate import AllocateConfig, choose_bits, stored_bytes
from splice.passes.spec import format_spec, parse_spec
from zoo_graphs import assert_error, calibration, captured, run_cli


def _instance(seed, layers=6, cands=(2, 3, 4, 8)):
    rng = np.random.default_rng(seed)
    params = rng.integers(100, 5000, layers).astype(float)
    base = rng.uniform(0.1, 10, layers)
    sens = base[:, None] * np.power(4.0, -np.array(cands))[None] * rng.uniform(0.5, 2, (layers, len(cands)))
    sens = np.sort(sens, 1)[:, ::-1]  # more bits, less error
    return params, np.array(cands, float), sens


def _brute_force(sens, budgets):
    best, best_choice = np.inf, None
    for choice in itertools.product(range(sens.shape[1]), repeat=sens.shape[0]):
        rows = np.arange(sens.shape[0])
        if all(cost[rows, choice].sum() <= limit + 1e-9 for _, cost, limit in budgets):
            total = sens[rows, choice].sum()
            if total < best:
                best, best_choice = total, choice
    return best, best_choice


@pytest.mark.parametrize("seed,avg", [(0, 3.5), (1, 3.0), (2, 4.2), (3, 2.5)])
def test_milp_matches_brute_force(seed, avg):
    params, cands, sens = _instance(seed)
    avg_cost = np.outer(params, cands) / params.sum()
    bytes_cost = np.outer(params, cands) / 8 + 10
    budgets = [("avg_bits", avg_cost, avg), ("max_bytes", bytes_cost, float(bytes_cost[:, 2].sum()))]
    choice = choose_bits(sens, budgets)
    best, _ = _brute_force(sens, budgets)
    rows = np.arange(len(params))
    assert sens[rows, choice].sum() == pytest.approx(best, rel=1e-9)
    assert avg_cost[rows, choice].sum() <= avg + 1e-9  # the budgets are met
    assert bytes_cost[rows, choice].sum() <= budgets[1][2] + 1e-9


def test_budget_no_plan_can_meet():
    params, cands, sens = _instance(0)
    cost = np.outer(params, cands)
    least = cost[:, 0].sum()
    with pytest.raises(ConfigError, match=f"budget max_bytes 10 cannot be met: the minimum achievable is {least:,.6g}"):
        choose_bits(sens, [("max_bytes 10", cost, 10.0)])


def test_stored_bytes_match_the_graph():
    zm, g = captured("llama")
    q = g.apply("quantize.rtn:bits=3,group_size=32,targets=q_proj")
    rep = q.history[-1]["report"]
    n, k = g.tensor("model.layers.0.self_attn.q_proj.weight").shape
    assert rep["weight_bytes_after"] == rep["layers"] * stored_bytes(n, k, 32, 3, True, 4)


def _calib(zm, g, n=2):
    return calibration(zm, g, n, seq=64 // n)  # 128 tokens: one per input feature of the widest layer


@pytest.fixture(scope="module")
def allocated():
    zm, g = captured("llama")
    return zm, g, g.apply("quantize.allocate:avg_bits=3.5,bits=2,3,4,8", calibration=_calib(zm, g))


def test_plan_meets_budget_and_is_in_the_graph(allocated, tmp_path):
    zm, g, q = allocated
    rep = q.history[-1]["report"]
    params = {module_path(n): g.tensor(n.args[1].target).numel() for n in g.nodes("linear")}
    mean = sum(params[p] * b for p, b in rep["plan"].items()) / sum(params[p] for p in rep["plan"])
    assert mean == pytest.approx(rep["avg_bits"], abs=1e-4) and mean <= 3.5 + 1e-9
    assert set(rep["plan"].values()) <= {2, 3, 4, 8} and len(set(rep["plan"].values())) > 1
    in_graph = {module_path(n): n.args[5] for n in q.nodes() if n.target == torch.ops.splice.qlinear.default}
    assert in_graph == rep["plan"]
    # the plan is no worse than uniform 3 bits (feasible at 3.5) on the pass's own objective
    chosen = sum(rep["sensitivity"][p][str(b)] for p, b in rep["plan"].items())
    assert chosen <= sum(s["3"] for s in rep["sensitivity"].values())
    for path, s in rep["sensitivity"].items():
        assert s["2"] >= s["3"] >= s["4"] >= s["8"], path
    assert rep["weighting"].startswith("fisher")
    # save / load keeps the plan (manifest and graph) and the outputs
    q.save(tmp_path / "art")
    back = splice.load(tmp_path / "art")
    assert {module_path(n): n.args[5] for n in back.nodes() if n.target == torch.ops.splice.qlinear.default} == rep["plan"]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["passes"][-1]["report"]["plan"] == rep["plan"]
    x = g.example_inputs
    assert torch.equal(q.run(*x)["logits"], back.run(*x)["logits"])


def test_more_bits_more_fidelity():
    zm, g = captured("llama")
    calib = _calib(zm, g)
    kl = {avg: g.apply(f"quantize.allocate:avg_bits={avg},bits=2,3,4", calibration=calib).history[-1]["fidelity"]
          ["logits"]["kl"] for avg in (2.5, 3.9)}
    rtn3 = g.apply("quantize.rtn:bits=3,group_size=32").history[-1]["fidelity"]["logits"]["kl"]
    assert kl[3.9] < rtn3 < kl[2.5] * 4 and kl[3.9] < kl[2.5]


def test_list_option_round_trips_through_spec():
    info, cfg = parse_spec("quantize.allocate:bits=2,4,avg_bits=3,method=gptq")
    assert cfg.bits == "2,4" and cfg.avg_bits == 3.0 and cfg.candidates() == (2, 4)
    assert parse_spec(format_spec(info, cfg))[1] == cfg


@pytest.mark.parametrize("spec,needle", [
    ("quantize.allocate:avg_bits=1.5", "avg_bits 1.5 cannot be met: the minimum achievable is 2"),
    ("quantize.allocate:bits=3,4,avg_bits=2.5", "avg_bits 2.5 cannot be met: the minimum achievable is 3"),
    ("quantize.allocate:bits=3,x", "bits: unknown candidate 'x'"),
    ("quantize.allocate:bits=1,4", "bits: unknown candidate '1'"),
    ("quantize.allocate:bits=4,9", "bits: unknown candidate '9'"),
    ("quantize.allocate:avg_bits=none", "give a budget"),
    ("quantize.allocate:method=awq", "method"),
])
def test_bad_config(spec, needle):
    with pytest.raises(ConfigError, match="quantize.allocate: " + needle):
        parse_spec(spec)


def test_bad_graph_inputs():  # without calibration: tests/passes/test_needs_calibration.py
    zm, g = captured("llama")
    with pytest.raises(ConfigError, match="quantize.allocate: budget max_bytes 1,000 cannot be met: the minimum achievable is"):
        g.apply("quantize.allocate:avg_bits=none,max_bytes=1000", calibration=_calib(zm, g, 1))
    with pytest.raises(ConfigError, match="already quantized"):
        g.apply("quantize.rtn").apply("quantize.allocate", calibration=_calib(zm, g, 1))
    with pytest.raises(ConfigError, match="allocate plans linear layers only"):
        g.apply("quantize.allocate:targets=embedding", calibration=_calib(zm, g, 1))


def test_config_defaults_are_valid():
    cfg = AllocateConfig()
    assert cfg.candidates() == (2, 3, 4, 8) and cfg.avg_bits == 3.5 and cfg.method == "rtn"


def test_cli_prints_plan_and_bad_budget(capsys, byte_tokenizer, calib_text, llama_hf_dir, tmp_path):
    calib = calib_text
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "run", llama_hf_dir, "-p", "quantize.allocate:avg_bits=3.5", "--calib", calib,
                              "--calib-samples", 4, "--calib-seqlen", 32, "-o", out)
    assert rc == 0, err
    assert "quantize.allocate plan: mean" in stdout and "model.layers.1.mlp.down_proj" in stdout
    bad = tmp_path / "bad"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.allocate:avg_bits=1", "--calib", calib, "-o", bad],
                 "avg_bits 1 cannot be met", "minimum achievable is 2", absent=[bad])
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.allocate:avg_bits=none,max_bytes=10", "--calib", calib,
                          "-o", bad],
                 "max_bytes 10 cannot be met", "minimum achievable", absent=[bad])
