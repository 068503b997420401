"""The prunability report (``ir/prunability.py``, ``splice inspect --prunability``): the Hill
estimate recovers a known power-law exponent; load is each layer's kept share."""
import pytest
import torch
from zoo_graphs import captured, run_cli

from splice.ir.prunability import hill_alpha, prunability, summary


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_hill_alpha_recovers_a_power_law_spectrum(alpha):
    gen = torch.Generator().manual_seed(0)
    n = 1024
    eig = (1 - torch.rand(n, generator=gen, dtype=torch.float64)) ** (-1 / (alpha - 1))  # Pareto, p(λ) ∝ λ^-α
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    w = u @ torch.diag(eig.sqrt()) @ v.T
    assert hill_alpha(w) == pytest.approx(alpha, rel=0.12)


def test_load_is_the_kept_share():
    _, g = captured("llama")
    pruned = g.apply("prune.magnitude:sparsity=0.5")
    rows = {r.key: r for r in prunability(pruned)}
    for key in pruned.masks:
        assert rows[key].load == pytest.approx(0.5, abs=0.01)
    assert rows["model.embed_tokens"].load == 1.0 and "lm_head" not in rows  # tied to the embedding: listed once
    total = summary(list(rows.values()))
    assert 0.5 < total["load"] < 1 and total["alpha"] > 1


def test_cli_prunability(capsys, llama_hf_dir):
    rc, out, err = run_cli(capsys, "inspect", llama_hf_dir, "--prunability")
    assert rc == 0, err
    assert "prunability (" in out and "mean alpha" in out and "model.layers.0.mlp.down_proj" in out
