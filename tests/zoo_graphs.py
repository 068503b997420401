"""Helpers shared by test modules: captured zoo graphs (each captured once per session), their
inputs, the one-line-error assertions the pass and CLI tests repeat, and ``structure``, a
graph's ops one per line for Before/Expected structural tests."""
import functools
import operator
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import fx

import splice
from splice.errors import ConfigError
from splice.eval import zoo


def fast_train() -> dict:
    """``splice.train`` options of the training tests: 64-token windows of 4, the byte tokenizer
    (vocab 256 = the zoo's), no progress bar."""
    from splice.eval.data import ByteTokenizer

    return dict(seq_len=64, batch_size=4, tokenizer=ByteTokenizer(), progress=False)


@functools.lru_cache(maxsize=None)
def captured(name: str):
    zm = zoo.build(name)
    return zm, splice.capture(zm.model, zm.example_inputs)


def input_grid(zm, graph, batches=(1, 3), seqs=(5, 17)):
    """Inputs at two batch sizes and two sequence lengths, in graph input order."""
    grid = []
    for b in batches:
        for s in seqs if zm.kind in ("decoder", "encoder") else seqs[:1]:
            kw = zm.make_inputs(b, s)
            grid.append(tuple(kw[n] for n in graph.input_names))
    return grid


def calibration(zm, graph, n=4, seq=24, seed=0):
    """``n`` calibration samples (batch 2 × ``seq`` tokens, seeds ``seed..seed+n-1``) in graph input order."""
    return [tuple(zm.make_inputs(2, seq, seed=seed + s)[k] for k in graph.input_names) for s in range(n)]


def unlike_samples(zm, graph):
    """16 calibration samples of a text model: every 8th (those a 1/8 holdout holds out) random
    tokens, the rest one token repeated: a fit to the rest does not carry to them."""
    rand = calibration(zm, graph, n=8, seq=32, seed=3)
    const = [(torch.full_like(s[0], 7), *s[1:]) for s in rand]
    return [rand[i % 8] if i % 8 == 7 else const[i % 8] for i in range(16)]


def first_output(graph, inputs):
    """The graph's first output (logits, or a CNN's scores) on ``inputs``."""
    return next(iter(graph.run(*inputs).values()))


def max_diff(a, b, inputs) -> float:
    """Largest absolute difference of two graphs' first outputs on ``inputs``."""
    return float((first_output(a, inputs) - first_output(b, inputs)).abs().max())


def mean_kl(g, q, samples) -> float:
    """KL(g ‖ q) of the next-token distributions (``logits``), per token, averaged over ``samples``."""
    F = torch.nn.functional
    return sum(float(F.kl_div(F.log_softmax(q.run(*x)["logits"], -1).flatten(0, -2),
                              F.log_softmax(g.run(*x)["logits"], -1).flatten(0, -2),
                              log_target=True, reduction="batchmean")) for x in samples) / len(samples)


class ComputedWeight(torch.nn.Module):
    """A linear whose weight is computed (``2·w``), so no stored tensor backs the layer."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w * 2)


def computed_weight_graph():
    return splice.capture(ComputedWeight(), (torch.randn(2, 3, 16),))


class RMSNorm(torch.nn.Module):
    """RMSNorm written out as HF's Llama code does: ``g · (x · rsqrt(mean(x², -1) + ε))``
    (``aten.pow``/``mean``/``add``/``rsqrt``/``mul``, then ``mul(g, ·)``), weight ``g`` in [0.5, 1.5)."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


# ------------------------------------------------------------------------- one-line errors


def assert_one_line_error(specs, message, model="llama"):
    """Running ``specs`` on the captured zoo ``model`` raises a one-line ConfigError matching ``message``."""
    _, g = captured(model)
    with pytest.raises(ConfigError, match=message) as err:
        splice.Pipeline(specs).run(g, probe=False)
    assert "\n" not in str(err.value)


def assert_bad_option(spec, message):
    """Parsing ``spec`` (before any graph) raises a ConfigError matching ``message``."""
    with pytest.raises(ConfigError, match=message):
        splice.Pipeline([spec])


def run_cli(capsys, *argv):
    """``splice ARGV`` in-process: (exit code, stdout, stderr)."""
    from splice.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(capsys, argv, *needles, rc=1, absent=()):
    """Run ``argv``; expect exit ``rc``, one ``splice: error:`` line containing every needle,
    no traceback, and none of the ``absent`` paths on disk. Returns the line."""
    code, out, err = run_cli(capsys, *argv)
    assert code == rc, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("splice: error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert "Traceback" not in out + err
    for path in absent:
        assert not os.path.lexists(path), f"{path} was left behind"
    return lines[0]


# ------------------------------------------------------------------------------- structure


def _op_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    name = str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    return name.removesuffix(".default")


def structure(graph) -> list[str]:
    """A Graph's (or GraphModule's) program, one line per op, comparable across graphs:
    ``input x``, ``linear = aten.linear(x, @fc1.weight, @fc1.bias)``, ``return (linear,)``.
    Stored tensors appear inline as ``@target``; an unread one gets its own ``unused @target``
    line. Ops are named by their op and order (``linear``, ``linear_1``), not by fx's names,
    so a rewrite that renames nodes still matches and a stray or missing op does not."""
    gm = graph.gm if hasattr(graph, "gm") else graph
    names: dict[fx.Node, str] = {}
    seen: dict[str, int] = {}
    lines = []

    def show(a):
        if isinstance(a, fx.Node):
            return f"@{a.target}" if a.op == "get_attr" else names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(show(x) for x in a)
            return f"({inner},)" if isinstance(a, tuple) and len(a) == 1 else \
                f"({inner})" if isinstance(a, tuple) else f"[{inner}]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {show(v)}" for k, v in a.items()) + "}"
        return repr(a)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = node.name
            lines.append(f"input {node.name}")
        elif node.op == "get_attr":
            if not node.users:
                lines.append(f"unused @{node.target}")
        elif node.op == "output":
            lines.append(f"return {show(node.args[0])}")
        else:
            op = _op_name(node.target)
            base = op.split(".")[1] if op.startswith(("aten.", "splice.")) else op
            k = seen.get(base, 0)
            seen[base] = k + 1
            names[node] = base if k == 0 else f"{base}_{k}"
            args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{names[node]} = {op}({', '.join(args)})")
    return lines


def assert_structure(graph, expected: list[str]):
    """``structure(graph) == expected``, showing both programs when they differ."""
    got = structure(graph)
    assert got == expected, "\n".join(["got:", *got, "", "expected:", *expected])
