"""``share.tie`` and ``share.layers``: tensors and blocks stored once and read many times — exact
where the tied tensors were equal, patterns as the papers define them, sizes that shrink by what
was shared, and the one-line errors (shapes that differ named)."""
import pytest
import torch
from zoo_graphs import assert_bad_option, assert_one_line_error, captured, input_grid, max_diff

import splice
from splice.ir.blocks import check_shareable, stack
from splice.ir.graph import set_attr
from splice.passes.share.layers import owners

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Q0, Q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"


def _with_copied_q(noise: float = 0.0):
    """The zoo Llama with layer 1's q_proj a copy of layer 0's (plus ``noise``·N(0, 1))."""
    zm, g = captured("llama")
    g = g.copy()
    q = g.tensor(Q0).detach()
    set_attr(g.gm, Q1, q + noise * torch.randn(q.shape, generator=torch.Generator().manual_seed(0)))
    return zm, g


def test_tie_of_equal_weights_is_exact_and_stores_them_once(tmp_path):
    zm, g = _with_copied_q()
    tied = g.apply("share.tie:targets=linear")
    report = tied.history[-1]["report"]
    assert report["groups"] == {Q0: [Q1]} and report["bytes_saved"] == g.tensor(Q0).numel() * 4
    assert Q1 not in tied.tensors() and g.num_params() - tied.num_params() == g.tensor(Q0).numel()
    assert all(max_diff(g, tied, x) == 0 for x in input_grid(zm, g)[:2])
    tied.save(tmp_path / "art")
    back = splice.load(tmp_path / "art")
    assert back.num_params() == tied.num_params()


def test_tie_tolerance():
    _, g = _with_copied_q(noise=1e-4)
    assert g.apply("share.tie:targets=linear").history[-1]["report"]["tied"] == 0
    assert g.apply("share.tie:targets=linear,tol=0.01").history[-1]["report"]["groups"] == {Q0: [Q1]}


def test_tie_leaves_adapters_alone():
    _, g = captured("llama")
    tied = g.apply("adapter.lora").apply("share.tie")
    assert not any(".adapters." in t for t in tied.history[-1]["report"]["groups"])
    assert all(".adapters." not in t for ts in tied.history[-1]["report"]["groups"].values() for t in ts)


def test_layer_patterns():
    assert owners("sequence", 6, 3) == [0, 0, 2, 2, 4, 4]
    assert owners("cycle", 6, 3) == [0, 1, 2, 0, 1, 2]
    assert owners("cycle_rev", 8, 2) == [0, 1, 1, 0, 0, 1, 1, 0]


def test_shared_layers_store_one_block():
    zm, g = captured("llama")
    shared = g.apply("share.layers:init=first")
    per_block = sum(t.numel() for n, t in g.tensors().items() if n.startswith("model.layers.1."))
    assert g.num_params() - shared.num_params() == per_block
    torch.testing.assert_close(shared.tensor(Q0), g.tensor(Q0))  # init=first: block 0's weights
    averaged = g.apply("share.layers")
    torch.testing.assert_close(averaged.tensor(Q0), (g.tensor(Q0) + g.tensor(Q1)) / 2)


def test_bad_input():
    assert_one_line_error(["share.layers:groups=2"], r"^share.layers: groups=2 must divide the 2 blocks of 'model.layers' "
                                                     "and be fewer")
    assert_one_line_error(["share.layers"], r"^share.layers: blocks 'blocks.1' and 'blocks.0' differ \('short.0.weight' "
                                            r"is in one only\)", model="cnn")  # a downsampling block: names them
    assert_bad_option("share.layers:pattern=zigzag", "pattern must be one of sequence, cycle, cycle_rev")
    assert_bad_option("share.tie:tol=-1", "tol must be >= 0")


def test_sharing_blocks_of_other_shapes_names_them():
    from splice.errors import ConfigError

    _, g = captured("llama")
    g = g.copy()
    set_attr(g.gm, Q1, torch.zeros(32, 64))  # as if layer 1 had 32 query channels
    with pytest.raises(ConfigError, match=r"^share.layers: cannot share 'model.layers.1.self_attn.q_proj.weight' "
                                          r"\(32, 64\) with 'model.layers.0.self_attn.q_proj.weight' \(64, 64\): shapes differ$"):
        check_shareable(g, stack(g, "test"), [0, 0], "share.layers")  # the check every sharing pass makes first


def test_dictionary_with_atoms_for_every_layer_is_exact_and_stores_the_atoms_once(tmp_path):
    zm, g = captured("llama")  # 2 blocks: the mean and 1 atom span both layers' weights
    shared = g.apply("share.dictionary:atoms=1")
    report = shared.history[-1]["report"]
    assert report["kinds"] == ["self_attn.k_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.weight",
                               "self_attn.v_proj.weight"]
    assert all(e < 1e-5 for e in report["relative_error"].values())
    assert all(max_diff(g, shared, x) <= 1e-5 for x in input_grid(zm, g)[:2])
    assert shared.op_counts()["splice.basis_weight"] == 8
    assert Q0 not in shared.tensors() and "shared.self_attn.q_proj.weight.atoms" in shared.tensors()


def test_dictionary_bad_input():
    assert_one_line_error(["share.dictionary:atoms=2"], r"^share.dictionary: atoms=2 must be fewer than the 2 blocks")
    assert_bad_option("share.dictionary:atoms=-1", "atoms must be >= 0")
    assert_one_line_error(["share.dictionary:targets=lm_head"], r"^share.dictionary: targets 'lm_head' select no layer "
                                                                 "present in every block")


def test_dictionary_atoms_train():
    """``splice::basis_weight`` differentiates in its base, atoms and coefficients (recovery training)."""
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True) for shape in ((3, 4), (2, 3, 4), (5, 2))]
    task = torch.tensor(3)
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.splice.basis_weight(a, b, c, task), args)
