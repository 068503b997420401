"""``merge.permute`` (Git Re-Basin weight matching) and ``splice eval --lmc``: permuting alone leaves
the second model's outputs unchanged (zoo llama with GQA and RoPE, zoo CNN with batch norm); on two
independently trained MLPs and CNNs the midpoint loss barrier after alignment is under half of naive
averaging's; the CLI prints the barriers; bad inputs are one-line errors."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_graphs import assert_error, input_grid, run_cli

import splice
from splice.errors import ConfigError
from splice.eval import zoo
from splice.eval.data import builtin_text
from splice.eval.lmc import lmc

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = 4


@pytest.fixture(scope="module")
def llamas():
    built = [zoo.build("llama", seed=s) for s in (0, 1)]
    return built[0], [splice.capture(b.model, built[0].example_inputs) for b in built]


def _exact(zm, a, b):
    aligned = splice.merge([a, b], "permute", t=1.0)
    for inputs in input_grid(zm, a)[:2]:
        want, got = b.run(*inputs), aligned.run(*inputs)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)
    same = splice.merge([a, b], "permute", t=0.0)
    assert all(torch.equal(x, same.tensor(t)) for t, x in a.tensors().items())
    return aligned.history[-1]["report"]


def test_permuting_alone_keeps_the_llamas_outputs(llamas):
    zm, (a, b) = llamas
    report = _exact(zm, a, b)
    kinds = [g["group"].split()[1] for g in report["groups_permuted"]]
    assert sorted(set(kinds)) == ["head_dim", "kv_heads", "mlp", "residual"] and report["units_moved"] > 200
    assert any("slices part of the axis" in s["why"] for s in report["groups_skipped"])  # RoPE's head_dim


def test_permuting_alone_keeps_the_cnns_outputs():
    built = [zoo.build("cnn", seed=s) for s in (0, 1)]
    a, b = (splice.capture(m.model, built[0].example_inputs) for m in built)
    report = _exact(built[0], a, b)
    assert [g["group"].split()[1] for g in report["groups_permuted"]] == ["residual", "residual"]
    assert report["units_moved"] > 40


# ------------------------------------------------------------------ trained models


def _labels(x: torch.Tensor) -> torch.Tensor:
    """A fixed random teacher's classes (centred so that every class occurs)."""
    g = torch.Generator().manual_seed(123)
    if x.dim() == 4:
        z = F.conv2d(x, torch.randn(8, 3, 3, 3, generator=g)).relu().mean((2, 3)) @ torch.randn(8, CLASSES, generator=g)
    else:
        z = (x @ torch.randn(x.shape[1], 64, generator=g)).relu() @ torch.randn(64, CLASSES, generator=g)
    return (z - z.mean(0)).argmax(-1)


def _model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, CLASSES))
    return nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, CLASSES))


def _trained(kind: str, seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    model, g = _model(kind, seed), torch.Generator().manual_seed(seed)
    steps, batch, lr = (300, 128, 1e-2) if kind == "mlp" else (150, 64, 1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _labelled_loss(graph, sample, outputs):
    return F.cross_entropy(outputs[0], _labels(sample[0]))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_alignment_halves_the_barrier_of_trained_models(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g) if kind == "mlp" else torch.randn(2048, 3, 6, 6, generator=g)
    y = _labels(x)
    a, b = (splice.capture(_trained(kind, seed, x, y), (x[:2],)) for seed in (1, 2))
    calibration = [(x[i:i + 512],) for i in range(0, 2048, 512)]
    aligned = splice.merge([a, b], "permute", t=1.0, calibration=calibration)
    result = lmc(a, b, calibration, points=3, aligned=aligned, loss=_labelled_loss)
    naive, after = result["naive"]["barrier"], result["aligned"]["barrier"]
    assert naive > 0.2 and after < 0.5 * naive, (naive, after)
    report = aligned.history[-1]["report"]["barrier"]  # the pass's own, label-free
    assert report["aligned"]["barrier"] < 0.5 * report["naive"]["barrier"], report
    mid = splice.merge([a, b], "permute", t=0.5)
    for target, w in a.tensors().items():
        torch.testing.assert_close(mid.tensor(target), (w + aligned.tensor(target)) / 2)


# ------------------------------------------------------------------ splice eval --lmc


@pytest.fixture
def lmc_inputs(tmp_path):
    other = tmp_path / "llama-1"
    zoo.build("llama", seed=1).model.save_pretrained(other)
    text = tmp_path / "text.txt"
    text.write_text(builtin_text("gpl3")[:4000])
    return other, text


def test_eval_lmc_prints_the_barriers(capsys, byte_tokenizer, llama_hf_dir, lmc_inputs):
    other, text = lmc_inputs
    rc, out, err = run_cli(capsys, "eval", "lmc", llama_hf_dir, other, "--data", text, "--samples", 4,
                           "--seq-len", 32, "--points", 3, "--align", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["alphas"] == [0.0, 0.5, 1.0] and result["samples"] == 4
    for key in ("naive", "aligned"):
        losses = result[key]["losses"]
        assert result[key]["barrier"] == pytest.approx(losses[1] - (losses[0] + losses[2]) / 2)
    assert result["naive"]["losses"][2] == pytest.approx(result["aligned"]["losses"][2], abs=1e-5)  # P(B) ≡ B
    layers = {row["layer"]: row for row in result["layers"]}
    assert 0 < layers["model.layers.0.mlp.up_proj"]["naive"] <= 1 and len(layers) == 15


@pytest.mark.slow
def test_eval_lmc_table(capsys, byte_tokenizer, llama_hf_dir, lmc_inputs):
    other, text = lmc_inputs
    rc, out, err = run_cli(capsys, "eval", llama_hf_dir, "--lmc", other, "--data", text, "--samples", 2,
                           "--seq-len", 16, "--points", 2)
    assert rc == 0, err
    assert "barrier naive: " in out and "aligned" not in out and "model.layers.1.mlp.down_proj" in out


# ------------------------------------------------------------------ errors


def test_bad_inputs_are_one_line_errors(llamas):
    _, (a, b) = llamas
    with pytest.raises(ConfigError, match=r"^merge.permute: takes exactly 2 model\(s\) besides the base, got 3$"):
        splice.merge([a, b, a], "permute")
    with pytest.raises(ConfigError, match=r"^merge.permute: t must be in \[0, 1\], got 2.0"):
        splice.merge([a, b], "permute", t=2.0)
    with pytest.raises(ConfigError, match=r"^merge.permute: max_iter must be in \[1, ∞\), got 0"):
        splice.merge([a, b], "permute", max_iter=0)
    cnn = zoo.build("cnn")
    other = splice.capture(cnn.model, cnn.example_inputs)
    with pytest.raises(ConfigError, match=r"^merge.permute: model 1 is not the architecture of model 0: "):
        splice.merge([a, other], "permute")
    with pytest.raises(ConfigError, match=r"^eval lmc: B is not the architecture of A: "):
        lmc(a, other, [a.example_inputs])


def test_eval_lmc_usage_errors(capsys, llama_hf_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    base = ["eval", llama_hf_dir, "--lmc", llama_hf_dir]
    assert_error(capsys, base, "--lmc needs --data FILE", rc=2)
    assert_error(capsys, base + ["--data", text, "--ppl", text], "--ppl belongs to perplexity", rc=2)
    assert_error(capsys, ["eval", llama_hf_dir, "--align", "--ppl", text], "--align belongs to --lmc MODEL", rc=2)
    assert_error(capsys, ["eval", llama_hf_dir], "give --ppl FILE", rc=2)
    assert_error(capsys, base + ["--data", tmp_path / "missing.txt"], "--data", "no such file")
    assert_error(capsys, ["eval", "lmc", llama_hf_dir, "--data", text], "one MODEL, or `lmc A B`", rc=2)
    code, _, err = run_cli(capsys, *base, "--data", text, "--points", 1)
    assert code == 2 and "expected at least 2 points" in err
