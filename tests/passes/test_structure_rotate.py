"""Before/Expected structure of ``quantize.rotate``: the rotation lives in the weights, so the
only change to the program is that each RMSNorm's ``mul(g, ·)`` is gone (``aten.rms_norm``
loses its weight) and a tied embedding gets its own table; no op is added. Output
preservation is tested in tests/passes/quantize/test_rotate.py."""
import re

import torch
from zoo_graphs import RMSNorm, assert_structure, captured, structure

import splice


class TiedDecoder(torch.nn.Module):
    """embed -> norm -> up -> relu -> down (+ residual) -> norm -> head, head tied to the embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.norm1, self.norm = torch.nn.Embedding(32, 8), RMSNorm(8), RMSNorm(8)
        self.up, self.down = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(16, 8, bias=False)
        self.head = torch.nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(self.norm1(h))))
        return self.head(self.norm(h))


class FusedNormDecoder(torch.nn.Module):
    """``nn.RMSNorm`` (``aten.rms_norm``) and biased linears; the final norm feeds the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.norm1, self.norm = torch.nn.Embedding(32, 8), torch.nn.RMSNorm(8), torch.nn.RMSNorm(8)
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 32, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(self.norm1(h))))
        return self.head(self.norm(h))


IDS = (torch.randint(0, 32, (2, 5)),)


NORM_0 = ["pow = aten.pow.Tensor_Scalar(embedding, 2)",
          "mean = aten.mean.dim(pow, [-1], True)",
          "add = aten.add.Tensor(mean, 1e-06)",
          "rsqrt = aten.rsqrt(add)"]
NORM_1 = ["pow_1 = aten.pow.Tensor_Scalar(add_1, 2)",
          "mean_1 = aten.mean.dim(pow_1, [-1], True)",
          "add_2 = aten.add.Tensor(mean_1, 1e-06)",
          "rsqrt_1 = aten.rsqrt(add_2)"]


def test_tied_decoder():
    g = splice.capture(TiedDecoder(), IDS)
    assert_structure(g, [
        "input ids",
        "embedding = aten.embedding(@head.weight, ids)",
        *NORM_0,
        "mul = aten.mul.Tensor(embedding, rsqrt)",
        "mul_1 = aten.mul.Tensor(@norm1.weight, mul)",
        "linear = aten.linear(mul_1, @up.weight)",
        "relu = aten.relu(linear)",
        "linear_1 = aten.linear(relu, @down.weight)",
        "add_1 = aten.add.Tensor(embedding, linear_1)",
        *NORM_1,
        "mul_2 = aten.mul.Tensor(add_1, rsqrt_1)",
        "mul_3 = aten.mul.Tensor(@norm.weight, mul_2)",
        "linear_2 = aten.linear(mul_3, @head.weight)",
        "return (linear_2,)"])
    rotated = g.apply("quantize.rotate")
    assert_structure(rotated, [
        "input ids",
        "embedding = aten.embedding(@embed.weight, ids)",  # untied: the head keeps head.weight
        *NORM_0,
        "mul = aten.mul.Tensor(embedding, rsqrt)",
        "linear = aten.linear(mul, @up.weight)",
        "relu = aten.relu(linear)",
        "linear_1 = aten.linear(relu, @down.weight)",
        "add_1 = aten.add.Tensor(embedding, linear_1)",
        *NORM_1,
        "mul_1 = aten.mul.Tensor(add_1, rsqrt_1)",
        "linear_2 = aten.linear(mul_1, @head.weight)",
        "return (linear_2,)"])
    assert sorted(rotated.tensors()) == ["down.weight", "embed.weight", "head.weight", "up.weight"]
    assert rotated.history[-1]["report"]["untied"] == ["embed.weight"]


def test_fused_rms_norm_loses_its_weight():
    g = splice.capture(FusedNormDecoder(), IDS)
    program = ["input ids",
               "embedding = aten.embedding(@embed.weight, ids)",
               "rms_norm = aten.rms_norm(embedding, [8], {norm1})",
               "linear = aten.linear(rms_norm, @up.weight, @up.bias)",
               "relu = aten.relu(linear)",
               "linear_1 = aten.linear(relu, @down.weight, @down.bias)",
               "add = aten.add.Tensor(embedding, linear_1)",
               "rms_norm_1 = aten.rms_norm(add, [8], {norm})",
               "linear_2 = aten.linear(rms_norm_1, @head.weight)",
               "return (linear_2,)"]
    assert_structure(g, [line.format(norm1="@norm1.weight", norm="@norm.weight") for line in program])
    rotated = g.apply("quantize.rotate")
    assert_structure(rotated, [line.format(norm1="None", norm="None") for line in program])
    assert sorted(rotated.tensors()) == ["down.bias", "down.weight", "embed.weight", "head.weight", "up.bias",
                                         "up.weight"]


def _ops(lines):
    return [line.split(" = ", 1)[1].split("(", 1)[0] for line in lines if " = " in line]


def test_zoo_llama_loses_exactly_its_norm_multiplies():
    """On the zoo llama (2 layers: 5 RMSNorms) the rotated program is the original one minus the
    five ``mul(g, ·)`` ops, in the same order."""
    _, g = captured("llama")
    before = structure(g)
    norm_mul = re.compile(r"= aten\.mul\.Tensor\(@[\w.]*norm\.weight, ")
    assert sum(bool(norm_mul.search(line)) for line in before) == 5
    expected = _ops(line for line in before if not norm_mul.search(line))
    assert _ops(structure(g.apply("quantize.rotate"))) == expected
