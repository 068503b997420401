"""Every pass that declares ``needs_calibration`` refuses to run without calibration data, with
one line naming the pass (before it reads the graph, on a decoder and on a CNN alike)."""
import pytest
from zoo_graphs import captured

import splice
from splice.errors import ConfigError

CALIBRATED = sorted(p.name for p in splice.list_passes() if p.needs_calibration)


def test_the_calibrated_passes():
    assert {"quantize.allocate", "quantize.awq", "quantize.discquant", "quantize.gptq", "quantize.pvtune",
            "quantize.reconstruct", "quantize.smoothquant"} <= set(CALIBRATED)


@pytest.mark.parametrize("model", ["llama", "cnn"])
@pytest.mark.parametrize("name", CALIBRATED)
def test_refused_without_calibration(name, model):
    _, g = captured(model)
    with pytest.raises(ConfigError, match=f"{name}: needs calibration data") as err:
        g.apply(name)
    assert "\n" not in str(err.value)
