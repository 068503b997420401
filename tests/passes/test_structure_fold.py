"""Before/Expected structure of ``adapter.fold`` and ``adapter.unfold`` on a two-layer MLP:
folding leaves the base op alone (plus the ``splice::folded_adapter`` record with ``keep``),
unfolding re-creates exactly the adapter chain, and no tensor is left behind. Numerics are
tested in tests/passes/adapters/test_adapters.py; these catch a stray or missing op that outputs would not."""
import json

import torch
from zoo_graphs import assert_structure

import splice

PLAIN = ["input x",
         "linear = aten.linear(x, @fc1.weight, @fc1.bias)",
         "relu = aten.relu(linear)",
         "linear_1 = aten.linear(relu, @fc2.weight, @fc2.bias)",
         "return (linear_1,)"]
LORA = ["input x",
        "linear = aten.linear(x, @fc1.weight, @fc1.bias)",
        "lora_delta = splice.lora_delta(x, @fc1.adapters.default.A, @fc1.adapters.default.B, "
        "@fc1.adapters.default.scale)",
        "add = aten.add.Tensor(linear, lora_delta)",
        "relu = aten.relu(add)",
        "linear_1 = aten.linear(relu, @fc2.weight, @fc2.bias)",
        "return (linear_1,)"]
ADAPTER = "@fc1.adapters.{0}.A, @fc1.adapters.{0}.B, @fc1.adapters.{0}.scale"


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp():
    return splice.capture(MLP(), (torch.randn(2, 16),))


def _record(names, base_op, originals, rank):
    meta = {"active": True, "alpha": 8.0, "dropout": 0.0, "init": "random", "method": "lora", "rank": rank,
            "rslora": False, "scaling": 8.0 / rank, "weight": 1.0}
    spec = {"adapters": [{"meta": meta, "method": "lora", "name": n} for n in names], "base_op": base_op,
            "originals": originals, "path": "fc1"}
    return repr(json.dumps(spec, sort_keys=True))


def test_lora_then_fold_and_unfold_on_a_float_base():
    plain = _mlp()
    assert_structure(plain, PLAIN)
    lora = plain.apply("adapter.lora:targets=fc1,init=random")
    assert_structure(lora, LORA)
    folded = lora.apply("adapter.fold")
    assert_structure(folded, [
        "input x",
        "linear = aten.linear(x, @fc1.weight, @fc1.bias)",
        f"folded_adapter = splice.folded_adapter(linear, [{ADAPTER.format('default')}], "
        f"{_record(['default'], 'aten.linear.default', [], 8)})",
        "relu = aten.relu(linear)",
        "linear_1 = aten.linear(relu, @fc2.weight, @fc2.bias)",
        "return (linear_1,)"])
    unfolded = folded.apply("adapter.unfold")
    assert_structure(unfolded, LORA)
    assert sorted(unfolded.tensors()) == sorted(lora.tensors())


def test_fold_without_keep_is_the_plain_graph():
    merged = _mlp().apply("adapter.lora:targets=fc1,init=random", "adapter.fold:keep=false")
    assert_structure(merged, PLAIN)
    assert sorted(merged.tensors()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]


def test_two_adapters_on_a_quantized_base():
    """A quantized base folds onto new packed tensors; the record keeps the originals and
    unfold points the base back at them (the folded ones are dropped)."""
    q = _mlp().apply("quantize.rtn:group_size=8")
    qlinear = "splice.qlinear(x, @fc1.{0}, @fc1.{1}, None, @fc1.bias, 4, 8)"
    rest = ["relu = aten.relu({0})",
            "qlinear_1 = splice.qlinear(relu, @fc2.qweight, @fc2.scales, None, @fc2.bias, 4, 8)",
            "return (qlinear_1,)"]
    two = ["input x",
           "qlinear = " + qlinear.format("qweight", "scales"),
           f"lora_delta = splice.lora_delta(x, {ADAPTER.format('default')})",
           "add = aten.add.Tensor(qlinear, lora_delta)",
           f"lora_delta_1 = splice.lora_delta(x, {ADAPTER.format('b')})",
           "add_1 = aten.add.Tensor(add, lora_delta_1)",
           rest[0].format("add_1"), *rest[1:]]
    lora = q.apply("adapter.lora:targets=fc1,init=random,rank=2", "adapter.lora:name=b,targets=fc1,init=random,rank=2")
    assert_structure(lora, two)
    folded = lora.apply("adapter.fold")
    assert_structure(folded, [
        "input x",
        "qlinear = " + qlinear.format("qweight_folded", "scales_folded"),
        f"folded_adapter = splice.folded_adapter(qlinear, [{ADAPTER.format('default')}, {ADAPTER.format('b')}, "
        f"@fc1.qweight, @fc1.scales], {_record(['default', 'b'], 'splice.qlinear.default', ['qweight', 'scales'], 2)})",
        rest[0].format("qlinear"), *rest[1:]])
    unfolded = folded.apply("adapter.unfold")
    assert_structure(unfolded, two)
    assert sorted(unfolded.tensors()) == sorted(lora.tensors())
