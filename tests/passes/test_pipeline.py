"""The Pipeline: verification, fidelity probe, provenance, timing, failure naming."""
from dataclasses import dataclass

import pytest
import torch

import splice
from splice.errors import ConfigError, VerifyError
from splice.ir.graph import set_attr
from splice.passes import base
from splice.passes.base import PassConfig, PassResult
from splice.passes.manager import PassError, Pipeline
from zoo_graphs import captured


@dataclass(frozen=True, kw_only=True)
class _Cfg(PassConfig):
    """test pass"""


@pytest.fixture
def register(monkeypatch):
    def add(name, fn, **kw):
        monkeypatch.setitem(base._REGISTRY, name, base.PassInfo(name, _Cfg, fn, "https://example.org", False, 1, **kw))
    return add


def test_report_has_fidelity_timing_and_spec():
    zm, g = captured("llama")
    result = Pipeline(["quantize.rtn:bits=8", "quantize.rtn:bits=4,targets=embedding"]).run(g)
    first, second = result.reports
    assert first["spec"] == "quantize.rtn:bits=8" and second["config"]["targets"] == "embedding"
    assert first["fidelity"]["logits"]["cosine"] > 0.999 > second["fidelity"]["logits"]["cosine"] > 0.95
    assert first["report"]["layers"] == 15 and first["seconds"] > 0
    assert str(Pipeline(["quantize.rtn:bits=8"])) == "quantize.rtn:bits=8"
    marked = {n.meta.get("splice_pass") for n in result.graph.gm.graph.nodes if "splice::" in str(n.target)
              or "splice." in str(n.target)}
    assert marked == {"quantize.rtn"}


def test_failure_names_the_pass_and_the_passes_before(register):
    def broken(graph, cfg, ctx):
        raise RuntimeError("boom")

    register("test.broken", broken)
    zm, g = captured("cnn")
    with pytest.raises(PassError, match=r"test\.broken: failed \(after quantize\.rtn\): RuntimeError: boom"):
        Pipeline(["quantize.rtn", "test.broken"]).run(g)


def test_verifier_rejects_a_pass_that_breaks_the_graph(register):
    def nan_weights(graph, cfg, ctx):
        node = next(graph.nodes("linear"))
        set_attr(graph.gm, node.args[1].target, torch.full_like(graph.tensor(node.args[1].target), float("nan")))
        return PassResult(graph, True, {})

    register("test.nan", nan_weights)
    zm, g = captured("cnn")
    with pytest.raises(VerifyError, match="test.nan: graph invalid after this pass: tensor .* NaN"):
        Pipeline(["test.nan"]).run(g)


def test_calibration_is_required_when_declared(monkeypatch):
    info = base.get_pass("quantize.rtn")
    monkeypatch.setitem(base._REGISTRY, "test.calib", base.PassInfo("test.calib", info.config_cls, info.fn,
                                                                     info.reference, True, 1))
    zm, g = captured("cnn")
    with pytest.raises(ConfigError, match="test.calib: needs calibration data"):
        Pipeline(["test.calib"]).run(g)
    out = Pipeline(["test.calib"]).run(g, calibration=[g.example_inputs]).graph
    assert out.history[-1]["pass"] == "test.calib"


def test_external_data_export(tmp_path):
    zm, g = captured("bert")
    path = splice.export_onnx(g, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > path.stat().st_size
    assert splice.parity(g, path, [g.example_inputs]) <= 1e-4
