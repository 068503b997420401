"""ONNX vs graph.module() parity for every zoo model, fp32 and after RTN int4 / int8."""
import pytest

import splice
from splice.eval import zoo
from zoo_graphs import captured, input_grid

SPECS = {
    "fp32": None,
    "int4": "quantize.rtn:bits=4,group_size=32,symmetric=false,targets=linear|embedding",
    "int8": "quantize.rtn:bits=8,group_size=32,targets=linear|embedding",
}


@pytest.mark.parametrize("variant", SPECS)
@pytest.mark.parametrize("model", zoo.ZOO_NAMES)
def test_onnx_parity(model, variant, tmp_path):
    zm, graph = captured(model)
    if SPECS[variant]:
        targets_embedding = any(n for n in graph.nodes("embedding"))
        spec = SPECS[variant] if targets_embedding else SPECS[variant].replace("|embedding", "")
        graph = graph.apply(spec)
    path = splice.export_onnx(graph, tmp_path / f"{model}.onnx")
    assert splice.parity(graph, path, input_grid(zm, graph)) <= 1e-4


def test_dynamic_dims_are_labelled(tmp_path):
    import onnx

    zm, graph = captured("llama")
    model = onnx.load(splice.export_onnx(graph, tmp_path / "m.onnx"))
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
