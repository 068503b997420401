"""lowrank.svd: full rank is exact, truncation by rank and by energy, stored bytes, one-line errors."""
import pytest
import torch

from zoo_graphs import assert_bad_option, assert_one_line_error, captured, max_diff

LOWRANK = "splice.lowrank_linear"


def test_full_rank_is_exact():
    zm, g = captured("llama")
    out = g.apply("lowrank.svd:energy=1.0")
    assert LOWRANK in out.op_counts() and "aten.linear" in out.op_counts()  # lm_head left out by default
    assert max_diff(g, out, g.example_inputs) <= 1e-5
    report = out.history[-1]["report"]
    assert max(report["rel_error"].values()) < 1e-5 and report["grew"]  # full-rank factors are bigger


def test_rank_truncates_and_bytes_are_the_factors():
    zm, g = captured("llama")
    out = g.apply("lowrank.svd:rank=4")
    report = out.history[-1]["report"]
    assert set(report["rank"].values()) == {4}
    factors = {k: t for k, t in out.tensors().items() if ".lowrank." in k}
    assert report["weight_bytes_after"] == sum(t.numel() * t.element_size() for t in factors.values())
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    a = next(t for k, t in factors.items() if k.endswith("q_proj.lowrank.A"))
    assert a.shape[0] == 4


def test_energy_picks_the_smallest_rank():
    from splice.passes.lowrank._common import rank_for

    w = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))  # squared shares 9/14, 4/14, 1/14
    assert [rank_for(w, 0, e) for e in (0.5, 0.9, 0.93, 1.0)] == [1, 2, 3, 3]
    assert rank_for(w, 2, 0.1) == 2


def test_weight_access_reads_the_product():
    from splice.ir.weights import dense_weight

    zm, g = captured("llama")
    out = g.apply("lowrank.svd:energy=1.0")
    node = next(n for n in out.nodes() if n.target == torch.ops.splice.lowrank_linear.default)
    w = g.tensor(node.args[1].target.replace(".lowrank.A", ".weight"))
    torch.testing.assert_close(dense_weight(out, node), w, atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_one_line_errors():
    assert_one_line_error(["lowrank.svd:rank=1000"], r"lowrank.svd: rank=1000 exceeds min\(in, out\) = \d+ of layer")
    assert_bad_option("lowrank.svd:energy=1.5", r"lowrank.svd: energy must be in \(0, 1\]")
    assert_bad_option("lowrank.svd:rank=-1", "lowrank.svd: rank must be >= 1")
    assert_one_line_error(["prune.magnitude:sparsity=0.5", "lowrank.svd:rank=4"], "lowrank.svd: layer .* is pruned")
    assert_one_line_error(["quantize.rtn:bits=4", "lowrank.svd:rank=4"], "matched no plain float linear")


@pytest.mark.parametrize("model", ["gpt2"])
def test_other_zoo_model(model):
    zm, g = captured(model)
    assert max_diff(g, g.apply("lowrank.svd:energy=1.0"), g.example_inputs) <= 1e-4
