"""quantize.discquant: rounding directions chosen by projected gradient descent on the
model's KL to the float model; codes stay on round-to-nearest's grid (each weight rounds to
one of its two neighbours) and the result beats round-to-nearest on held-out outputs."""
import functools

import pytest
import torch

import splice
from splice.kernels.quant.grid import dequantize_packed
from zoo_graphs import calibration, captured, mean_kl

_calib = functools.partial(calibration, seq=32)


def test_discquant_beats_round_to_nearest_with_neighbouring_codes():
    zm, g = captured("llama")
    calib, test = _calib(zm, g), _calib(zm, g, n=2, seed=100)
    rtn = g.apply("quantize.rtn:bits=3,group_size=16")
    q = g.apply("quantize.discquant:bits=3,group_size=16,steps=60", calibration=calib)
    assert mean_kl(g, q, test) < 0.95 * mean_kl(g, rtn, test)
    report = q.history[-1]["report"]
    assert report["integral_fraction_before_final_rounding"] > 0.9  # the linear term reached a vertex
    # every weight sits on one of its two grid neighbours, on RTN's scales
    target = "model.layers.0.mlp.down_proj"
    w = g.tensor(target + ".weight")
    a, b = (dict(x.gm.named_buffers()) | dict(x.gm.named_parameters()) for x in (q, rtn))
    assert torch.equal(a[target + ".scales"], b[target + ".scales"])
    deq = dequantize_packed(a[target + ".qweight"], a[target + ".scales"], None, 3, 16)
    step = a[target + ".scales"].abs().repeat_interleave(16, 1)
    assert ((deq - w).abs() <= step * (1 + 1e-4)).all()
    assert not torch.equal(a[target + ".qweight"], b[target + ".qweight"])


def test_held_out_samples_decide_between_the_rounding_and_round_to_nearest():
    zm, g = captured("llama")
    q = g.apply("quantize.discquant:bits=3,group_size=16,steps=8", calibration=_calib(zm, g, n=8))
    ours, nearest = q.history[-1]["report"]["held_out_kl_discquant_rtn"]  # KL on the last 2 samples
    rtn = g.apply("quantize.rtn:bits=3,group_size=16")
    same = all(torch.equal(a, b) for a, b in zip(q.tensors().values(), rtn.tensors().values()))
    assert same == (ours >= nearest)


def test_bad_options():  # without calibration: tests/passes/test_needs_calibration.py
    zm, g = captured("llama")
    with pytest.raises(splice.SpliceError, match="lr must be > 0 and reg >= 0"):
        g.apply("quantize.discquant:reg=-1", calibration=_calib(zm, g, n=1))
