"""Before/Expected structure of ``quantize.smoothquant``: where ``1/s`` folds into the op that
produces a group's input (an RMSNorm weight, a preceding linear's rows through ReLU) the program
is unchanged; elsewhere exactly one ``mul(x, @<layer>.smoothquant_inv_scale)`` appears before
the group, and ``mul=false`` leaves those groups (and so the whole program) alone. Output
preservation is tested in tests/passes/quantize/test_w8a8.py."""
import torch
from zoo_graphs import RMSNorm, assert_structure

import splice


class Block(torch.nn.Module):
    """Four groups: {a, b} read the norm (fold: norm), c reads a sum (mul), down reads relu(c)
    (fold: c's rows), head reads gelu(down) (mul)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = RMSNorm(16)
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
        self.c, self.down, self.head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        n = self.norm(x)
        h = torch.relu(self.a(n)) + self.b(n)
        return self.head(torch.nn.functional.gelu(self.down(torch.relu(self.c(h)))))


BEFORE = ["input x",
          "pow = aten.pow.Tensor_Scalar(x, 2)",
          "mean = aten.mean.dim(pow, [-1], True)",
          "add = aten.add.Tensor(mean, 1e-06)",
          "rsqrt = aten.rsqrt(add)",
          "mul = aten.mul.Tensor(x, rsqrt)",
          "mul_1 = aten.mul.Tensor(@norm.weight, mul)",
          "linear = aten.linear(mul_1, @a.weight, @a.bias)",
          "relu = aten.relu(linear)",
          "linear_1 = aten.linear(mul_1, @b.weight, @b.bias)",
          "add_1 = aten.add.Tensor(relu, linear_1)",
          "linear_2 = aten.linear(add_1, @c.weight, @c.bias)",
          "relu_1 = aten.relu(linear_2)",
          "linear_3 = aten.linear(relu_1, @down.weight, @down.bias)",
          "gelu = aten.gelu(linear_3)",
          "linear_4 = aten.linear(gelu, @head.weight, @head.bias)",
          "return (linear_4,)"]


def _smoothed(spec):
    g = splice.capture(Block(), (torch.randn(2, 16),))
    assert_structure(g, BEFORE)
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 16, generator=gen) * torch.linspace(0.1, 5, 16),) for _ in range(2)]
    return g.apply(spec, calibration=calib)


def test_folds_where_exact_and_inserts_one_mul_elsewhere():
    out = _smoothed("quantize.smoothquant")
    assert_structure(out, [
        *BEFORE[:11],
        "mul_2 = aten.mul.Tensor(add_1, @c.smoothquant_inv_scale)",
        "linear_2 = aten.linear(mul_2, @c.weight, @c.bias)",
        "relu_1 = aten.relu(linear_2)",
        "linear_3 = aten.linear(relu_1, @down.weight, @down.bias)",
        "gelu = aten.gelu(linear_3)",
        "mul_3 = aten.mul.Tensor(gelu, @head.smoothquant_inv_scale)",
        "linear_4 = aten.linear(mul_3, @head.weight, @head.bias)",
        "return (linear_4,)"])
    report = out.history[-1]["report"]
    assert {k: v["site"] for k, v in report["smoothed"].items()} == {
        "a": "norm:norm", "c": "mul", "down": "linear:c", "head": "mul"}
    assert report["scales_folded"] == 2 and report["scales_mul"] == 2


def test_without_mul_only_the_folds_happen():
    out = _smoothed("quantize.smoothquant:mul=false")
    assert_structure(out, BEFORE)
    report = out.history[-1]["report"]
    assert sorted(report["smoothed"]) == ["a", "down"] and sorted(report["left_alone"]) == ["c", "head"]
