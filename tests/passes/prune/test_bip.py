"""``prune.bip`` (BiP): scores start at the magnitude mask (outputs exactly magnitude pruning's), the
scores' gradient is BiP's implicit gradient, training moves the mask by projected SGD within the
budget, ``prune.bip_finish`` records masks that reproduce the trained graph exactly and export; the
CLI round trip (prune.bip -> splice train -> prune.bip_finish); one-line errors."""
import pytest
import torch
from zoo_graphs import assert_bad_option, assert_error, captured, input_grid, run_cli

import splice
from splice.errors import ConfigError
from splice.eval.data import ByteTokenizer, builtin_text
from splice.ir.sparsity import check_masks
from splice.passes.prune.bip import project_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BIP_OP = torch.ops.splice.bip_weight.default


@pytest.fixture(scope="module")
def llama():
    return captured("llama")


@pytest.fixture(scope="module")
def trained(llama):
    _, g = llama
    out = g.apply("prune.bip:sparsity=0.5,mask_lr=0.05")
    graph, report = splice.train(out, [builtin_text("gpl3")[:20000]], steps=20, lr=1e-3, seq_len=64, batch_size=4,
                                 tokenizer=ByteTokenizer(), progress=False, trainable="adapters,weights")
    return out, graph, report


def test_starts_as_magnitude_pruning_and_exports(llama, tmp_path):
    zm, g = llama
    out = g.apply("prune.bip:sparsity=0.5")
    assert out.history[-1]["report"]["layers"] == 14 and out.op_counts()["splice.bip_weight"] == 14
    magnitude = g.apply("prune.magnitude:sparsity=0.5")
    for inputs in input_grid(zm, g)[:2]:
        torch.testing.assert_close(out.run(*inputs)["logits"], magnitude.run(*inputs)["logits"], atol=1e-5, rtol=0)
    assert splice.parity(out, splice.export_onnx(out, tmp_path / "b.onnx"), input_grid(zm, g)) <= 1e-4


def test_scores_gradient_is_the_implicit_gradient():
    w, s, x = torch.randn(4, 6), torch.rand(4, 6).requires_grad_(), torch.randn(3, 6)
    wp = w.clone().requires_grad_()
    z = BIP_OP(wp, s, 0.5, 2.0, 0.1)
    y = torch.nn.functional.linear(x, z)
    y.square().sum().backward()
    keep = (s.detach().reshape(-1).argsort().argsort() >= 12).reshape(4, 6).float()
    g = 2 * y.detach().T @ x  # dℓ/dz
    torch.testing.assert_close(wp.grad, keep * g)
    torch.testing.assert_close(s.grad, w * g - keep * g * g / 2.0)


def test_projection_meets_the_budget():
    x = torch.tensor([1.7, 0.9, 0.6, 0.2, -0.4])
    s = x.clone()
    project_budget(s, 1.0)
    assert float(s.min()) >= 0 and float(s.max()) <= 1
    assert abs(float(s.sum()) - 1.0) < 1e-5
    inside = (s > 0) & (s < 1)  # one shift μ for every score strictly inside (0, 1); the rest clamped
    mu = float((x - s)[inside][0])
    torch.testing.assert_close((x - s)[inside], torch.full_like(s[inside], mu))
    torch.testing.assert_close(s, (x - mu).clamp(0, 1))
    under = torch.tensor([0.2, 0.3])
    project_budget(under, 1.0)
    assert torch.equal(under, torch.tensor([0.2, 0.3]))  # inside the set: unchanged


def test_training_moves_the_mask_and_finish_is_exact(llama, trained, tmp_path):
    zm, g = llama
    out, graph, report = trained
    assert report["trainable_tensors"] == 14 * 2 + 1  # scores, their weights, the (tied) embedding
    assert report["train_loss_last"] < report["train_loss_first"]
    for name, s in graph.tensors().items():
        if name.endswith("bip_scores"):
            assert float(s.detach().min()) >= 0 and float(s.detach().max()) <= 1
    done = graph.apply("prune.bip_finish")
    rep = done.history[-1]["report"]
    assert rep["layers"] == 14 and rep["sparsity"] == 0.5 and set(rep["layer_sparsity"].values()) == {0.5}
    assert rep["differs_from_magnitude"] > 0.01  # the learned mask is not the magnitude mask it started from
    assert "splice.bip_weight" not in done.op_counts() and not check_masks(done)
    assert not any(t.endswith("bip_scores") for t in done.tensors())
    for inputs in input_grid(zm, g)[:2]:
        torch.testing.assert_close(done.run(*inputs)["logits"], graph.run(*inputs)["logits"], atol=1e-5, rtol=0)
    assert splice.parity(done, splice.export_onnx(done, tmp_path / "d.onnx"), input_grid(zm, g)) <= 1e-4


def test_fixed_weights_learn_only_the_mask(llama):
    _, g = llama
    out = g.apply("prune.bip:sparsity=0.5,mask_lr=0.05,targets=model.layers.0.mlp.*")
    graph, report = splice.train(out, [builtin_text("gpl3")[:5000]], steps=3, lr=1e-3, seq_len=64, batch_size=2,
                                 tokenizer=ByteTokenizer(), progress=False)
    assert report["trainable_tensors"] == 3
    weights = {t: v for t, v in out.tensors().items() if t.endswith("proj.weight")}
    assert all(torch.equal(graph.tensor(t), v) for t, v in weights.items())
    assert any(not torch.equal(graph.tensor(t), out.tensor(t)) for t in out.tensors() if t.endswith("bip_scores"))


def test_cli_round_trip(llama_hf_dir, byte_tokenizer, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(builtin_text("gpl3")[:8000])
    art, tr, fin = tmp_path / "a", tmp_path / "t", tmp_path / "f"
    assert run_cli(capsys, "run", llama_hf_dir, "-o", art, "-p", "prune.bip:sparsity=0.5")[0] == 0
    rc, _, err = run_cli(capsys, "train", art, "--data", text, "-o", tr, "--steps", "2", "--seq-len", "32",
                         "--trainable", "adapters,weights")
    assert rc == 0, err
    assert run_cli(capsys, "run", tr, "-o", fin, "-p", "prune.bip_finish")[0] == 0
    assert splice.load(fin).history[-1]["report"]["sparsity"] == 0.5


def test_bad_input(llama, capsys, llama_hf_dir, tmp_path):
    _, g = llama
    assert_bad_option("prune.bip:gamma=0", "prune.bip: gamma must be > 0, got 0")
    assert_bad_option("prune.bip:mask_lr=-1", "prune.bip: mask_lr must be > 0, got -1")
    assert_bad_option("prune.bip:sparsity=1", r"prune.bip: sparsity must be in \[0, 1\)")
    with pytest.raises(ConfigError, match="^prune.bip: 'model.layers.0.self_attn.q_proj' is already pruned; run prune.bip first"):
        g.apply("prune.magnitude", "prune.bip")
    with pytest.raises(ConfigError, match="^prune.bip_finish: the graph has no BiP scores"):
        splice.passes.base.get_pass("prune.bip_finish").fn(g.copy(), None, None)
    assert_error(capsys, ["run", llama_hf_dir, "-o", tmp_path / "o", "-p", "prune.bip_finish"], "prune.bip_finish",
                 "prune.bip", absent=[tmp_path / "o"])
