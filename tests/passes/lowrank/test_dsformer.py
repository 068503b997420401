"""lowrank.dsformer: D S reproduces the weight when S can be dense, fits better with more non-zeros,
stores fewer bytes than the weight at the defaults; ONNX parity; one-line errors."""
import torch

import splice
from splice.passes.lowrank.dsformer import dense_sparse
from splice.kernels.lowrank.factors import scatter_rows
from zoo_graphs import assert_bad_option, assert_one_line_error, captured, input_grid, max_diff


def _error(w, k, s):
    d, values, index = dense_sparse(w, k, s, 8)
    return float((w - d @ scatter_rows(values, index, k)).norm() / w.norm())


def test_dense_s_is_exact_and_more_nonzeros_fit_better():
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))
    assert _error(w, 24, 24) < 1e-4  # k = out, every entry of S kept: exact
    errors = [_error(w, 12, s) for s in (1, 3, 6)]
    assert errors[0] > errors[1] > errors[2]


def test_zoo_model_bytes_and_onnx(tmp_path):
    zm, g = captured("llama")
    out = g.apply("lowrank.dsformer")
    report = out.history[-1]["report"]
    assert out.op_counts()["splice.dense_sparse_linear"] == report["layers"] > 0
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    exact = g.apply("lowrank.dsformer:rank=64,nonzeros=64,targets=re:.*q_proj")
    assert max_diff(g, exact, g.example_inputs) < 1e-3
    path = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, path, input_grid(zm, g)) <= 1e-4


def test_bad_inputs_are_one_line_errors():
    assert_bad_option("lowrank.dsformer:rank=4,nonzeros=8", r"lowrank.dsformer: nonzeros must be at most rank \(4\)")
    assert_one_line_error(["lowrank.dsformer:rank=1000"], r"lowrank.dsformer: rank=1000 exceeds min\(in, out\)")
