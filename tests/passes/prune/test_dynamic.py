"""``prune.dynamic``: a low-rank predictor per MLP masks all but the k best-predicted channels of each
token; the predictor is the least-squares fit (exact on a low-rank linear target), the mask keeps
exactly k channels, and the graph exports with the predictor (ORT parity)."""
import pytest
import torch
from zoo_graphs import assert_bad_option, calibration, captured, input_grid

import splice
from splice.ir.metrics import compare_outputs
from splice.passes.prune.dynamic import fit_predictor, recall


def test_the_predictor_recovers_a_low_rank_target():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 24, generator=gen)
    act = x @ torch.randn(24, 6, generator=gen) @ torch.randn(6, 40, generator=gen)  # rank 6, linear in x
    down, up = fit_predictor(x, act, rank=6, ridge=0.0)  # fits |act|: not linear, so only its best rank-6 map
    exact = fit_predictor(x, act.abs(), rank=40, ridge=0.0)
    target = act.abs()
    residual = lambda d, u: float(((x @ d.T) @ u.T - target).square().mean())  # noqa: E731
    assert residual(*exact) <= residual(down, up) + 1e-6
    lin = x @ torch.randn(24, 40, generator=gen)
    lin = lin - lin.min()  # a non-negative target that is linear in x (up to the constant)
    d2, u2 = fit_predictor(torch.cat([x, torch.ones(2000, 1)], 1), lin, rank=25, ridge=0.0)
    assert recall(torch.cat([x, torch.ones(2000, 1)], 1), lin, d2, u2, 10) > 0.99


def test_masks_k_channels_per_token_and_exports(tmp_path):
    zm, g = captured("llama")
    out = g.apply("prune.dynamic:sparsity=0.5,rank=16", calibration=calibration(zm, g, n=8, seq=32))
    rep = out.history[-1]["report"]
    assert rep["layers"] == 2 and rep["k"] == 64 and rep["recall"] > 0.55  # chance is 0.5
    seen = []
    topk = [n for n in out.gm.graph.nodes if n.target == torch.ops.splice.predicted_topk.default]
    assert len(topk) == 2
    inputs = input_grid(zm, g)[0]
    from torch.fx import Interpreter

    class Spy(Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in topk:
                seen.append(value)
            return value

    Spy(out.gm).run(*inputs)
    assert all(bool(((v != 0).sum(-1) <= 64).all()) for v in seen)
    fid = compare_outputs(g.run(*inputs), out.run(*inputs))
    assert fid["logits"]["cosine"] > 0.95
    onnx = splice.export_onnx(out, tmp_path / "d.onnx")
    assert splice.parity(out, onnx, input_grid(zm, g)) <= 1e-4


@pytest.mark.parametrize("spec, message", [
    ("prune.dynamic:sparsity=1", r"prune.dynamic: sparsity must be in \[0, 1\), got 1.0"),
    ("prune.dynamic:rank=0", "prune.dynamic: rank must be >= 1, got 0"),
])
def test_bad_options(spec, message):
    assert_bad_option(spec, message)
