"""quantize.pvtune: scales move only in P steps, codes only in V steps and at most
``v_fraction`` of them per step, every weight stays on the group grid, and the result is
closer to the float model than round-to-nearest on held-out inputs."""
import functools
import re

import pytest
import torch
from zoo_graphs import assert_error, calibration, captured, mean_kl, run_cli

import splice
from splice.kernels.quant.grid import GroupGrid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER = "model.layers.1.mlp.down_proj"
_calib = functools.partial(calibration, seq=32)  # as in tests/passes/quantize/test_discquant.py


def _stored(q, layer=LAYER, bits=2, group=16):
    """(codes, scales) of ``layer`` as stored in the artifact."""
    t = dict(q.gm.named_buffers()) | dict(q.gm.named_parameters())
    return GroupGrid(bits, group, True).unpack_codes(t[layer + ".qweight"]), t[layer + ".scales"]


@pytest.fixture(scope="module")
def llama():
    zm, g = captured("llama")
    return zm, g, _calib(zm, g), g.apply("quantize.rtn:bits=2,group_size=16")


def test_pvtune_beats_round_to_nearest_at_2_bits(llama):
    zm, g, _, rtn = llama
    calib, held_out = _calib(zm, g, n=8), _calib(zm, g, n=4, seed=100)
    q = g.apply("quantize.pvtune:bits=2,group_size=16", calibration=calib)
    report = q.history[-1]["report"]
    before, after = report["loss_before_after"]
    assert after < 0.75 * before  # training KL, whole quantized model (measured 0.0026 -> 0.0016)
    assert mean_kl(g, q, held_out) < 0.9 * mean_kl(g, rtn, held_out)  # held out (measured 0.86x)
    assert sum(report["codes_changed_per_v_step"]) > 0  # V steps did move codes


def test_codes_change_only_in_v_steps_and_only_up_to_the_fraction(llama):
    zm, g, calib, rtn = llama
    rtn_codes, rtn_scales = _stored(rtn)
    p_only = g.apply("quantize.pvtune:bits=2,group_size=16,steps=0,p_steps=6", calibration=calib)
    codes, scales = _stored(p_only)
    assert torch.equal(codes, rtn_codes) and not torch.equal(scales, rtn_scales)
    assert torch.equal(torch.sign(scales), torch.sign(rtn_scales))

    fraction = 2e-3
    v_only = g.apply(f"quantize.pvtune:bits=2,group_size=16,steps=3,p_steps=0,v_fraction={fraction}",
                     calibration=calib)
    report = v_only.history[-1]["report"]
    limit = int(fraction * report["trained_weights"])
    assert all(0 <= c <= limit for c in report["codes_changed_per_v_step"]) and limit == 147
    codes, scales = _stored(v_only)
    assert torch.equal(scales, rtn_scales)  # no P step: RTN's scales exactly
    changed = 0
    for name in [n.removesuffix(".qweight") for n, _ in v_only.gm.named_buffers() if n.endswith(".qweight")]:
        a, b = _stored(v_only, name)[0], _stored(rtn, name)[0]
        assert int(a.min()) >= 0 and int(a.max()) <= 3  # 2-bit codes
        changed += int((a != b).sum())
    assert 0 < changed <= sum(report["codes_changed_per_v_step"])
    # the weights are exactly scale * (code - zero) on the stored grid
    deq = GroupGrid(2, 16, True).dequantize(codes, scales, torch.full_like(scales, 2, dtype=torch.int32))
    w = g.tensor(LAYER + ".weight")
    assert ((deq - w).abs() <= 2 * scales.abs().repeat_interleave(16, 1) + 1e-6).all()


@pytest.mark.parametrize(("init", "extra"), [("rtn", "symmetric=true"), ("rtn", "symmetric=false"),
                                           ("gptq", "symmetric=false")])
def test_no_steps_is_the_start_bit_for_bit(llama, init, extra):
    zm, g, calib, _ = llama
    spec = f"bits=2,group_size=16,{extra}"
    q = g.apply(f"quantize.pvtune:{spec},init={init},steps=0,p_steps=0", calibration=calib)
    ref = g.apply(f"quantize.{init}:{spec}", calibration=calib)
    a, b = (dict(x.gm.named_buffers()) | dict(x.gm.named_parameters()) for x in (q, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_start(llama):
    zm, g, calib, _ = llama
    gptq = g.apply("quantize.gptq:bits=2,group_size=16", calibration=calib)
    trained = g.apply("quantize.pvtune:bits=2,group_size=16,init=gptq,steps=1,p_steps=4,holdout=0", calibration=calib)
    before, after = trained.history[-1]["report"]["loss_before_after"]
    assert after < before
    assert mean_kl(g, trained, calib) < mean_kl(g, gptq, calib)
    # judged on a held-out sample: never worse than the GPTQ start there (here it keeps the start)
    judged = g.apply("quantize.pvtune:bits=2,group_size=16,init=gptq,steps=1,p_steps=4", calibration=calib)
    assert mean_kl(g, judged, calib) <= mean_kl(g, gptq, calib)


def test_a_p_step_that_raises_the_loss_is_undone_and_retried_at_half_the_rate(llama):
    _, g, calib, _ = llama
    q = g.apply("quantize.pvtune:bits=2,group_size=16,steps=1,p_steps=4,lr=4,holdout=0", calibration=calib)
    report = q.history[-1]["report"]
    rates = report["p_step_learning_rates"]
    assert len(rates) == 2 and all(r == 0.0 or 4 / r in (2, 4, 8, 16, 32, 64, 128) for r in rates)
    assert 4 not in rates  # a rate of 4 in log-scale blows the scales up (measured [0.0, 0.0625])
    before = report["loss_before_after"][0]
    losses = [before, report["loss_after_each_p_step"][0], report["loss_after_each_v_step"][0],
              report["loss_after_each_p_step"][1]]
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # every step kept lowers the training loss
    if rates[-1] == 0.0:  # no try of the last P step lowered the loss: its scales are the V step's
        assert losses[3] == losses[2]


def test_held_out_samples_choose_the_result(llama):
    zm, g, _, _ = llama
    calib = _calib(zm, g, n=8)
    q = g.apply("quantize.pvtune:bits=2,group_size=16,steps=3,p_steps=4,holdout=0.25", calibration=calib)
    report = q.history[-1]["report"]
    assert report["held_out_samples"] == 2
    scores = report["held_out_loss_at_checkpoints"]
    assert len(scores) == 3 + 2  # start, after each V step, end
    assert report["chosen_checkpoint"] == scores.index(min(scores)) and min(scores) <= scores[0]
    # the result is the chosen state: its loss on the two held-out samples is that checkpoint's
    held_out = mean_kl(g, q, calib[6:])
    assert held_out == pytest.approx(scores[report["chosen_checkpoint"]], rel=1e-3)
    # with holdout=0 every sample trains and the training loss chooses
    everything = g.apply("quantize.pvtune:bits=2,group_size=16,steps=1,p_steps=2,holdout=0", calibration=calib)
    report = everything.history[-1]["report"]
    assert report["held_out_samples"] == 0 and "held_out_loss_at_checkpoints" not in report


@pytest.mark.parametrize(("spec", "needle"), [
    ("quantize.pvtune:bits=1", "bits must be 2..8, got 1"),
    ("quantize.pvtune:bits=9", "bits must be 2..8, got 9"),
    ("quantize.pvtune:v_fraction=0", "v_fraction must be in (0, 1], got 0"),
    ("quantize.pvtune:v_fraction=1.5", "v_fraction must be in (0, 1], got 1.5"),
    ("quantize.pvtune:init=awq", "init"),
    ("quantize.pvtune:holdout=1", "holdout must be in [0, 1), got 1"),
    ("quantize.pvtune:holdout=-0.1", "holdout must be in [0, 1), got -0.1"),
])
def test_bad_options(spec, needle):
    zm, g = captured("llama")
    with pytest.raises(splice.SpliceError, match=r"quantize\.pvtune: .*" + re.escape(needle)):
        g.apply(spec, calibration=_calib(zm, g, n=1))


def test_needs_a_float_model(llama):  # and calibration: tests/passes/test_needs_calibration.py
    zm, g, calib, rtn = llama
    with pytest.raises(splice.SpliceError, match="quantize.pvtune: 'model.layers.0.self_attn.q_proj' is already quantized"):
        rtn.apply("quantize.pvtune", calibration=calib)


def test_cli(capsys, byte_tokenizer, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.pvtune:bits=2,group_size=64", "-o", out],
                 "quantize.pvtune", "--calib", absent=[out])
    calib = tmp_path / "calib.txt"
    calib.write_text("PV-Tuning moves scales and codes in turn. " * 40)
    rc, stdout, err = run_cli(capsys, "run", llama_hf_dir, "-p", "quantize.pvtune:bits=2,group_size=64,steps=1,p_steps=2",
                              "--calib", calib, "--calib-samples", 4, "--calib-seqlen", 32, "-o", out)
    assert rc == 0, err
    art = splice.load(out)
    assert art.history[-1]["pass"] == "quantize.pvtune"
    assert sum(n.target == torch.ops.splice.qlinear.default for n in art.gm.graph.nodes) == 15
    ids = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(art.module()(ids, torch.ones_like(ids))[0]).all()
