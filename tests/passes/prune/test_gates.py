"""Trainable channel gates: ``prune.channels:mode=gates`` inserts them without changing outputs,
training pulls the open share to the budget, ``prune.gates`` folds them and removes the closed
channels exactly (and the lowest open ones with ``amount``); one-line errors."""
import pytest
import torch
from zoo_graphs import assert_bad_option, captured, input_grid

import splice
from splice.errors import ConfigError
from splice.eval.data import ByteTokenizer, builtin_text
from splice.ir.graph import set_attr
from splice.kernels.prune.gate_math import gate_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gated():
    zm, g = captured("llama")
    return zm, g, g.apply("prune.channels:mode=gates,amount=0.5,penalty=10")


def _gates(graph) -> dict[str, torch.Tensor]:
    return {t: v for t, v in graph.tensors().items() if t.endswith("channel_gate")}


def _closed(graph, counts: dict[str, int]):
    """A copy of ``graph`` whose first ``counts[target]`` channels of each gate are closed."""
    out = graph.copy()
    for target, n in counts.items():
        a = out.tensor(target).detach().clone()
        a[:n] = -6.0
        set_attr(out.gm, target, a)
    return out


def test_insertion_changes_nothing_and_exports(gated, tmp_path):
    zm, g, out = gated
    assert out.history[-1]["report"]["gated"] == 2 * 128 and len(_gates(out)) == 2
    for inputs in input_grid(zm, g)[:2]:
        assert torch.equal(out.run(*inputs)["logits"], g.run(*inputs)["logits"])
    onnx = splice.export_onnx(_closed(out, {t: 16 for t in _gates(out)}), tmp_path / "g.onnx")
    assert splice.parity(_closed(out, {t: 16 for t in _gates(out)}), onnx, input_grid(zm, g)) <= 1e-4


def test_training_pulls_the_open_share_to_the_budget(gated):
    _, _, out = gated
    trained, report = splice.train(out, [builtin_text("gpl3")[:20000]], steps=60, lr=0.1, seq_len=64, batch_size=4,
                                   tokenizer=ByteTokenizer(), progress=False)
    assert report["trainable_tensors"] == 2
    values = torch.cat([gate_values(v.detach()) for v in _gates(trained).values()])
    assert abs(float(values.mean()) - 0.5) < 0.06


def test_closed_channels_are_removed_exactly(gated, tmp_path):
    zm, g, out = gated
    targets = sorted(_gates(out))
    closed = _closed(out, {targets[0]: 40, targets[1]: 10})
    pruned = closed.apply("prune.gates")
    rep = pruned.history[-1]["report"]
    assert rep["closed"] == 50 and rep["units_removed"] == 50
    assert g.num_params() - pruned.num_params() == 50 * 3 * 64  # gate, up rows and down columns
    assert not _gates(pruned) and "splice.channel_gate" not in pruned.op_counts()
    for inputs in input_grid(zm, g)[:2]:
        torch.testing.assert_close(pruned.run(*inputs)["logits"], closed.run(*inputs)["logits"], atol=1e-5, rtol=0)
    onnx = splice.export_onnx(pruned, tmp_path / "p.onnx")
    assert splice.parity(pruned, onnx, input_grid(zm, g)) <= 1e-4


def test_amount_removes_the_lowest_open_gates(gated):
    _, g, out = gated
    targets = sorted(_gates(out))
    pruned = _closed(out, {targets[0]: 8}).apply("prune.gates:amount=0.25")
    assert pruned.history[-1]["report"]["units_removed"] == 2 * 32


def test_bad_input(gated):
    _, g, out = gated
    assert_bad_option("prune.channels:mode=mask", "prune.channels: mode must be one of prune, gates")
    assert_bad_option("prune.gates:amount=1", r"prune.gates: amount must be in \[0, 1\)")
    assert_bad_option("prune.channels:mode=gates,penalty=-1", "prune.channels: penalty must be >= 0, got -1.0")
    with pytest.raises(ConfigError, match="^prune.gates: the graph has no channel gates"):
        g.apply("prune.gates")
    with pytest.raises(ConfigError, match="^prune.gates: every gate of group #"):
        _closed(out, {t: 128 for t in _gates(out)}).apply("prune.gates")
