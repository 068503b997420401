"""``splice export ART --hf DIR``: a structurally pruned model as a transformers directory whose
config says the new widths, which ``from_pretrained`` loads and which computes what the artifact
computes; per-layer widths a config cannot express, quantized graphs and graphs not captured from
transformers are refused in one line with nothing written."""
import json

import pytest
import torch
from zoo_graphs import assert_error, run_cli

import splice
from splice.eval import zoo


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, zoo_hf_dir):
    """The zoo llama and qwen2 as HF dirs, pruned: 25 % of MLP channels, half the KV groups, one block."""
    out = {}
    for name in ("llama", "qwen2"):
        g = splice.capture(zoo_hf_dir(name))
        art = tmp_path_factory.mktemp(f"pruned-{name}") / "art"
        g.apply("prune.channels:amount=0.25", "prune.heads:amount=0.5", "prune.depth:score=random").save(art)
        out[name] = art
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_export_reloads_and_matches(capsys, pruned, name, tmp_path):
    hf = tmp_path / "hf"
    rc, out, err = run_cli(capsys, "export", pruned[name], "--hf", hf, "--check", "--atol", "1e-5")
    assert rc == 0, err
    config = json.loads((hf / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["num_hidden_layers"]) == (96, 2, 1, 1)
    model = type(zoo.build(name).model).from_pretrained(hf, dtype=torch.float32).eval()
    art = splice.load(pruned[name])
    kw = zoo.build(name).make_inputs(3, 11)
    with torch.no_grad():
        ref = model(**kw, use_cache=False).logits
    assert torch.allclose(art.run(**{k: kw[k] for k in art.input_names})["logits"], ref, atol=1e-5)


def test_non_uniform_widths_are_refused(capsys, llama_hf_dir, tmp_path):
    art = tmp_path / "art"
    splice.capture(llama_hf_dir).apply("prune.channels:amount=0.25,targets=model.layers.0.*").save(art)
    hf = tmp_path / "hf"
    capsys.readouterr()  # transformers' loading progress
    assert_error(capsys, ["export", art, "--hf", hf], "--hf: no LlamaConfig gives 'model.layers.0.mlp.gate_proj.weight' "
                 "the shape (96, 64): per-layer widths differ", absent=[hf])


def test_quantized_and_non_hf_graphs_are_refused(capsys, llama_hf_dir, tmp_path):
    art = tmp_path / "q"
    splice.capture(llama_hf_dir).apply("quantize.rtn:bits=4,group_size=32").save(art)
    capsys.readouterr()
    assert_error(capsys, ["export", art, "--hf", tmp_path / "hf"], "--hf writes float transformers weights; this "
                 "graph uses splice.qlinear", absent=[tmp_path / "hf"])
    module = tmp_path / "m"
    zm = zoo.build("llama")
    splice.capture(zm.model, zm.example_inputs).save(module)
    capsys.readouterr()
    assert_error(capsys, ["export", module, "--hf", tmp_path / "hf"], "--hf: the artifact was not captured from a "
                 "transformers model", absent=[tmp_path / "hf"])
