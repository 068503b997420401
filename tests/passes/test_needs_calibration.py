"""Every pass that declares ``needs_calibration`` (with its default options) refuses to run without
calibration data, with one line naming the pass (before it reads the graph, on a decoder and on a
CNN alike); a pass that needs it only with some options refuses with those."""
import pytest
from zoo_graphs import captured

import splice
from splice.errors import ConfigError

CALIBRATED = sorted(p.name for p in splice.list_passes() if p.calibrated(p.config_cls()))


def test_the_calibrated_passes():
    assert {"quantize.allocate", "quantize.awq", "quantize.discquant", "quantize.gptq", "quantize.pvtune",
            "quantize.reconstruct", "quantize.smoothquant", "prune.wanda", "prune.sparsegpt", "prune.depth"} <= set(CALIBRATED)


@pytest.mark.parametrize("model", ["llama", "cnn"])
@pytest.mark.parametrize("name", CALIBRATED)
def test_refused_without_calibration(name, model):
    _, g = captured(model)
    with pytest.raises(ConfigError, match=f"{name}: needs calibration data") as err:
        g.apply(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["prune.nm:criterion=wanda", "prune.nm:criterion=sparsegpt",
                                  "prune.channels:score=wanda", "prune.heads:score=wanda"])
def test_refused_by_option(spec):
    _, g = captured("llama")
    name = spec.split(":")[0]
    g.apply(name)  # the default: data-free
    with pytest.raises(ConfigError, match=f"{name}: needs calibration data"):
        g.apply(spec)
