"""quantize.reconstruct: starts on the round-to-nearest grid, lowers the float-output error
by training rounding offsets and scales block by block, and bias correction zeroes the mean
output error on calibration data."""
import pytest
import torch

import splice
from zoo_graphs import calibration, captured, unlike_samples


_calib = calibration


def _error(g, q, samples):
    return sum(float((g.run(*x)["logits"] - q.run(*x)["logits"]).pow(2).mean()) for x in samples) / len(samples)


def test_no_steps_and_no_bias_correction_is_round_to_nearest():
    zm, g = captured("llama")
    calib, test = _calib(zm, g, n=3), _calib(zm, g, n=1, seed=50)[0]
    rtn = g.apply("quantize.rtn:bits=3,group_size=16")
    rec = g.apply("quantize.reconstruct:bits=3,group_size=16,steps=0,bias_correction=false", calibration=calib)
    a, b = rtn.run(*test)["logits"], rec.run(*test)["logits"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("scope", ["block", "layer"])
def test_reconstruction_beats_round_to_nearest(scope):
    zm, g = captured("llama")
    calib, test = _calib(zm, g), _calib(zm, g, n=2, seed=50)
    rtn = _error(g, g.apply("quantize.rtn:bits=3,group_size=16"), test)
    q = g.apply(f"quantize.reconstruct:bits=3,group_size=16,scope={scope},steps=30", calibration=calib)
    assert _error(g, q, test) < 0.95 * rtn
    losses = q.history[-1]["report"]["block_loss_before_after"]
    assert losses and all(after <= before for before, after in losses.values())
    assert sum(after for _, after in losses.values()) < 0.9 * sum(before for before, _ in losses.values())
    assert q.op_counts().get("splice.qlinear", 0) > 0


def test_bias_correction_zeroes_the_mean_output_error():
    """For the last layer nothing downstream changes, so its corrected bias makes the mean
    calibration output error zero, also for a layer that had no bias."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16, bias=False))
    x = torch.randn(8, 32) + 0.5
    g = splice.capture(model, (x,))
    calib = [(torch.randn(8, 32) + 0.5,) for _ in range(3)]
    q = g.apply("quantize.reconstruct:bits=2,group_size=16,steps=0", calibration=calib)
    err = torch.cat([g.run(*c)[g.output_names[0]] - q.run(*c)[g.output_names[0]] for c in calib])
    assert err.mean(0).abs().max() < 1e-5 < err.abs().max()
    assert q.history[-1]["report"]["bias_corrected_layers"] == 2


def test_windows_that_do_not_carry_to_held_out_samples_are_put_back():
    zm, g = captured("llama")
    spec = "quantize.reconstruct:bits=3,group_size=16,steps=20,bias_correction=false"
    # trained on one repeated token, judged on the held-out random ones
    held = g.apply(spec, calibration=unlike_samples(zm, g)).history[-1]["report"]["block_loss_before_after"]
    assert all(after <= before for before, after in held.values())
    assert any(after == before for before, after in held.values())  # put back
    judged_on_fit = g.apply(f"{spec},holdout=0", calibration=unlike_samples(zm, g)).history[-1]["report"]
    assert all(after < before for before, after in judged_on_fit["block_loss_before_after"].values())


def test_bad_options():  # without calibration: tests/passes/test_needs_calibration.py
    zm, g = captured("llama")
    with pytest.raises(splice.SpliceError, match="window must be >= 1"):
        g.apply("quantize.reconstruct:window=0", calibration=_calib(zm, g, n=1))
