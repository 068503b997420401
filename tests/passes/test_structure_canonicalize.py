"""Before/Expected structure of capture's canonicalization (``splice/ir/canonical.py``): each
Before is an fx program written with aten ops, each Expected the exact program canonicalize
must return (``addmm``/``mm``/``matmul`` with a stored weight -> ``aten.linear``, transposes
of the weight absorbed, dtype asserts and dead nodes dropped, everything else untouched)."""
import pytest
import torch
from torch import fx
from zoo_graphs import assert_structure, captured, structure

from splice.ir.canonical import canonicalize
from splice.ir.graph import Graph

aten = torch.ops.aten


class _Weights(torch.nn.Module):
    """``w [16, 8]`` (K×N, as a matmul reads it), ``w_nk [8, 16]`` (N×K, as linear reads it), ``b [8]``."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(16, 8, generator=g))
        self.w_nk = torch.nn.Parameter(torch.randn(8, 16, generator=g))
        self.b = torch.nn.Parameter(torch.randn(8, generator=g))
        self.w3 = torch.nn.Parameter(torch.randn(2, 16, 8, generator=g))


class AddMM(_Weights):  # HF GPT-2's Conv1D
    def forward(self, x):
        return (aten.addmm.default(self.b, x, self.w),)


class MM(_Weights):
    def forward(self, x):
        return (aten.mm.default(x, self.w),)


class MatMul3D(_Weights):
    def forward(self, x):
        return (aten.matmul.default(x.unsqueeze(0), self.w),)


class Transposed(_Weights):  # W already N×K, reached through t / transpose / permute
    def forward(self, x):
        a = aten.mm.default(x, aten.t.default(self.w_nk))
        b = aten.matmul.default(x, aten.transpose.int(self.w_nk, 0, 1))
        c = aten.addmm.default(self.b, x, aten.permute.default(self.w_nk, [1, 0]))
        return (a, b, c)


class SharedWeight(_Weights):  # W is read by the matmul and by another op: Wᵀ is a new tensor
    def forward(self, x):
        return (aten.mm.default(x, self.w), aten.sum.default(self.w))


class Asserts(_Weights):
    def forward(self, x):
        aten._assert_tensor_metadata.default(x, dtype=torch.float32)
        return (aten.mm.default(x, self.w),)


class Untouched(_Weights):
    """No stored 2-D weight, or an addmm with alpha/beta: nothing to canonicalize."""

    def forward(self, x, y):
        return (aten.mm.default(x, y), aten.matmul.default(x, self.w3),
                aten.addmm.default(self.b, x, self.w, beta=2.0))


def _graph(module, inputs, dead: tuple[str, ...] = ()) -> Graph:
    gm = fx.symbolic_trace(module)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for target in dead:  # what export leaves for a tied weight: a get_attr nobody reads
        setattr(gm, target, getattr(module, target))
        with gm.graph.inserting_before(first):
            gm.graph.get_attr(target)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return Graph(gm, names, [f"out{i}" for i in range(len(module(*inputs)))], tuple(inputs))


X = torch.randn(3, 16)

CASES = {
    "addmm": (AddMM(), (X,), [
        "input x",
        "linear = aten.linear(x, @w, @b)",
        "return (linear,)"]),
    "mm": (MM(), (X,), [
        "input x",
        "linear = aten.linear(x, @w)",
        "return (linear,)"]),
    "matmul_3d_input": (MatMul3D(), (X,), [
        "input x",
        "unsqueeze = unsqueeze(x, 0)",
        "linear = aten.linear(unsqueeze, @w)",
        "return (linear,)"]),
    "transposed": (Transposed(), (X,), [
        "input x",
        "linear = aten.linear(x, @w_nk)",
        "linear_1 = aten.linear(x, @w_nk)",
        "linear_2 = aten.linear(x, @w_nk, @b)",
        "return (linear, linear_1, linear_2)"]),
    "shared_weight": (SharedWeight(), (X,), [
        "input x",
        "linear = aten.linear(x, @w_t)",
        "sum = aten.sum(@w)",
        "return (linear, sum)"]),
    "asserts": (Asserts(), (X,), [
        "input x",
        "linear = aten.linear(x, @w)",
        "return (linear,)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_canonical_form(case):
    module, inputs, expected = CASES[case]
    before = _graph(module, inputs)
    shown = structure(before)
    after = canonicalize(before)
    assert_structure(after, expected)
    assert structure(before) == shown  # the input graph is left untouched
    for got, want in zip(after.gm(*inputs), module(*inputs)):
        torch.testing.assert_close(got, want)


def test_stored_kxn_weight_is_replaced_by_its_transpose_under_its_own_name():
    module = MM()
    after = canonicalize(_graph(module, (X,)))
    assert after.tensor("w").shape == (8, 16) and torch.equal(after.tensor("w"), module.w.detach().t())
    assert after.tensor("w").is_contiguous()


def test_transposed_weight_is_read_in_place():
    module = Transposed()
    after = canonicalize(_graph(module, (X,)))
    assert sorted(after.tensors()) == ["b", "w_nk"]
    assert torch.equal(after.tensor("w_nk"), module.w_nk.detach())


def test_shared_weight_keeps_the_original_for_other_readers():
    module = SharedWeight()
    after = canonicalize(_graph(module, (X,)))
    assert torch.equal(after.tensor("w"), module.w.detach())
    assert torch.equal(after.tensor("w_t"), module.w.detach().t())


def test_dead_get_attr_is_dropped():
    before = _graph(MM(), (X,), dead=("w_nk",))
    assert structure(before) == ["input x", "unused @w_nk", "mm = aten.mm(x, @w)", "return (mm,)"]
    after = canonicalize(before)
    assert_structure(after, CASES["mm"][2])
    assert sorted(after.tensors()) == ["w"] and not hasattr(after.gm, "w_nk")


def test_nothing_to_canonicalize_is_left_alone():
    module = Untouched()
    inputs = (X, torch.randn(16, 8))
    before = _graph(module, inputs)
    expected = ["input x", "input y",
                "mm = aten.mm(x, y)",
                "matmul = aten.matmul(x, @w3)",
                "addmm = aten.addmm(@b, x, @w, beta=2.0)",
                "return (mm, matmul, addmm)"]
    assert structure(before) == expected
    assert_structure(canonicalize(before), expected)


def test_captured_gpt2_has_one_linear_per_conv1d():
    """HF GPT-2's Conv1D layers (``addmm`` on a K×N weight) and its LM head each become one
    ``aten.linear``; no addmm, mm, matmul or dtype assert is left."""
    from transformers.pytorch_utils import Conv1D

    zm, g = captured("gpt2")
    ops = [line.split(" = ", 1)[1].split("(", 1)[0] for line in structure(g) if " = " in line]
    layers = sum(isinstance(m, (Conv1D, torch.nn.Linear)) for m in zm.model.modules())
    assert ops.count("aten.linear") == layers == 9
    assert not {"aten.addmm", "aten.mm", "aten.matmul", "aten._assert_tensor_metadata"} & set(ops)
