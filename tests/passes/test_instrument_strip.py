"""Observers are removed by a pass (``instrument.strip``) before export; the exporter refuses a
graph that still has them with one line naming that pass."""
import pytest
import torch
from zoo_graphs import captured, input_grid

import splice
from splice.errors import ExportError


def test_strip_restores_the_graph_and_export_refuses_observers(tmp_path):
    zm, g = captured("llama")
    observed = g.apply("instrument.observe")
    assert observed.op_counts().get("splice.observe")
    with pytest.raises(ExportError, match=r"^export: the graph still has \d+ instrument op\(s\) \(splice::observe\); "
                                          r"remove them first with the pass instrument\.strip") as err:
        splice.export_onnx(observed, tmp_path / "m.onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "m.onnx").exists()
    stripped = observed.apply("instrument.strip")
    assert stripped.op_counts() == g.op_counts()
    assert stripped.history[-1]["report"]["observers_removed"] == observed.op_counts()["splice.observe"]
    x = g.example_inputs
    assert torch.equal(stripped.run(*x)["logits"], g.run(*x)["logits"])
    path = splice.export_onnx(stripped, tmp_path / "m.onnx")
    assert splice.parity(stripped, path, input_grid(zm, g)[:2]) <= 1e-4


def test_strip_needs_observers_first():
    _, g = captured("llama")
    with pytest.raises(splice.SpliceError, match="instrument.strip: requires instrument.observe"):
        g.apply("instrument.strip")
