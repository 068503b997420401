"""``prune.dpruner`` (D-Pruner): the score from a general and a domain calibration set is the
paper's |g·w − ½(F + 2λG)w²|; the general set is required (one-line errors from Python and the
CLI). On a random zoo model gradients say little (its loss sits at maximum entropy): quality on a
domain is tested on SmolLM2 (tests/real/test_real_prune.py)."""
import copy

import pytest
import torch
from zoo_graphs import assert_bad_option, assert_error, calibration, captured, run_cli

from splice.errors import ConfigError
from splice.ir.sparsity import weight_layers
from splice.passes.prune._common import smallest_dropped


@pytest.fixture(scope="module")
def llama():
    zm, g = captured("llama")
    domain = [(torch.randint(0, 32, s[0].shape, generator=torch.Generator().manual_seed(i)), s[1])
              for i, s in enumerate(calibration(zm, g, n=4, seq=32))]  # a narrow "domain": tokens 0..31
    return zm, g, domain, calibration(zm, g, n=4, seq=32, seed=50)


def _grad_and_fisher(model, samples, names):
    """Mean gradient and mean squared per-sample gradient of the parameters ``names``, eagerly."""
    params = dict(model.named_parameters())
    mean = {n: torch.zeros_like(params[n]) for n in names}
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    for ids, mask in samples:
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        for n in names:
            mean[n] += params[n].grad / len(samples)
            fisher[n] += params[n].grad.square() / len(samples)
    return mean, fisher


def test_score_is_the_papers(llama):
    zm, g, domain, general = llama
    out = g.apply("prune.dpruner:sparsity=0.5,lam=0.5,targets=model.layers.0.mlp.up_proj", calibration=domain,
                  datasets={"general": general})
    model = copy.deepcopy(zm.model).requires_grad_(True)
    name = "model.layers.0.mlp.up_proj.weight"
    w = dict(model.named_parameters())[name].detach()
    gg, fg = _grad_and_fisher(model, general, [name])
    gd, fd = _grad_and_fisher(model, domain, [name])
    general_imp = (gg[name] * w - 0.5 * fg[name] * w.square()).abs()
    score = (gd[name] * w - 0.5 * (fd[name] + 2 * 0.5 * general_imp) * w.square()).abs()
    expected = smallest_dropped(score, 0.5, per_row=True)
    got = out.masks["model.layers.0.mlp.up_proj"]
    assert (got == expected).float().mean() > 0.995  # float32 ties at the cut aside
    assert len(weight_layers(out)) == len(weight_layers(g))


def test_the_general_set_is_required(llama, capsys, llama_hf_dir, tmp_path):
    _, g, domain, _ = llama
    with pytest.raises(ConfigError, match=r"^prune.dpruner: needs the calibration set 'general' \(--calib-set"):
        g.apply("prune.dpruner", calibration=domain)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "prune.dpruner", "--calib", text, "-o", out],
                 "prune.dpruner: needs the calibration set 'general'", absent=[out])
    assert_error(capsys, ["run", llama_hf_dir, "-p", "prune.dpruner", "--calib", text, "--calib-set", "general", "-o",
                          out], "--calib-set general: expected NAME=SOURCE", rc=2, absent=[out])


def test_cli_with_a_general_set(capsys, llama_hf_dir, byte_tokenizer, tmp_path):
    domain, general = tmp_path / "domain.txt", tmp_path / "general.txt"
    domain.write_text("0 1 2 3 4 5 6 7 8 9 " * 800)
    general.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    rc, out, err = run_cli(capsys, "run", llama_hf_dir, "-p", "prune.dpruner:sparsity=0.5", "--calib", domain,
                           "--calib-set", f"general={general}", "--calib-samples", 4, "--calib-seqlen", 64,
                           "-o", tmp_path / "art")
    assert rc == 0, err
    import json

    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["passes"][-1]["datasets"]["general"]["samples"] == 4


def test_bad_lambda():
    assert_bad_option("prune.dpruner:lam=-1", "prune.dpruner: lam must be >= 0, got -1.0")
