"""PEFT interop: adapters saved by PEFT load onto captured bases with PEFT's outputs, splice writes
directories PEFT loads, inits match PEFT's, and bad directories get one-line errors."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo_graphs import captured

import splice
from splice.errors import ConfigError
from splice.eval import zoo

peft = pytest.importorskip("peft")

TARGETS = {  # model: (target_modules, extra LoraConfig options)
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              {"use_rslora": True, "alpha_pattern": {"v_proj": 3}}),
    "gpt2": (["c_attn", "c_proj", "c_fc"], {}),  # Conv1D: PEFT sets fan_in_fan_out itself
    "bert": (["query", "value", "dense"], {"lora_alpha": 5}),
}


def _peft_model(model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(zoo.build(model).model, peft.LoraConfig(**options)).eval()


def _outputs(pm, kw):
    with torch.no_grad():
        out = pm(**kw)
    return out


def _assert_matches(graph, pm, zm, tol=1e-5):
    for batch, seq in ((1, 5), (3, 17)):
        kw = zm.make_inputs(batch, seq, seed=batch)
        ref = _outputs(pm, kw)
        for name, value in graph.run(**kw).items():
            assert float((value - getattr(ref, name)).abs().max()) <= tol, name


@pytest.mark.parametrize("model", list(TARGETS))
def test_peft_directory_round_trip(model, tmp_path):
    zm, g = captured(model)
    targets, extra = TARGETS[model]
    options = {"r": 4, "lora_alpha": 16, "target_modules": targets, "init_lora_weights": False, **extra}
    pm = _peft_model(model, **options)  # random non-zero A and B
    pm.save_pretrained(tmp_path / "peft")
    loaded = splice.load_peft(g, tmp_path / "peft")
    assert loaded.op_counts()["splice.lora_delta"] == sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A"))
    _assert_matches(loaded, pm, zm)
    assert float((loaded.run(**zm.example_inputs)[g.output_names[0]] - g.run(**zm.example_inputs)[g.output_names[0]]).abs().max()) > 1e-2
    assert sum(p.numel() for p in splice.adapter_parameters(loaded).values()) == pm.get_nb_trainable_parameters()[0]
    splice.save_peft(loaded, tmp_path / "back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(zoo.build(model).model, tmp_path / "back").eval()
    _assert_matches(loaded, back, zm)
    _assert_matches(splice.load_peft(g, tmp_path / "back"), pm, zm)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_equal_peft(init):
    zm, g = captured("llama")
    pm = _peft_model("llama", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
    ours = g.apply(f"adapter.lora:init={init},rank=4,alpha=8,targets=q_proj|down_proj")
    sd = pm.state_dict()
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        for peft_key, key in (("lora_A.default.weight", "adapters.default.A"), ("lora_B.default.weight", "adapters.default.B"),
                              ("base_layer.weight", "weight")):
            torch.testing.assert_close(ours.tensor(f"{path}.{key}"), sd[f"base_model.model.{path}.{peft_key}"],
                                       atol=1e-6, rtol=0)
    _assert_matches(ours, pm, zm)


def test_two_adapters_from_peft_by_name(tmp_path):
    zm, g = captured("llama")
    pm = _peft_model("llama", r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm.save_pretrained(tmp_path / "p")
    one = splice.load_peft(g, tmp_path / "p", name="a")
    with pytest.raises(ConfigError, match="already has an adapter named 'a'"):
        splice.load_peft(one, tmp_path / "p", name="a")
    two = splice.load_peft(one, tmp_path / "p", name="b")
    assert {i.name for i in splice.list_adapters(two)} == {"a", "b"}
    _assert_matches(splice.deactivate_adapter(two, "b"), pm, zm)
    with pytest.raises(ConfigError, match="initialized with pissa"):
        splice.save_peft(g.apply("adapter.lora:init=pissa,targets=q_proj"), tmp_path / "x")
    with pytest.raises(ConfigError, match="no unfolded adapter named 'c'"):
        splice.save_peft(two, tmp_path / "y", name="c")


def _splice_dir(tmp_path, model="llama", targets="q_proj"):
    _, g = captured(model)
    return splice.save_peft(g.apply(f"adapter.lora:init=random,rank=2,targets={targets}"), tmp_path / model)


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("change,message", [
    ({"peft_type": "FOO"}, "peft_type 'FOO' is not supported"),
    ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
    ({"lora_bias": True}, "lora_bias is not supported"),
    ({"use_qalora": True}, "QA-LoRA"),
])
def test_unsupported_peft_configs(tmp_path, change, message):
    _, g = captured("llama")
    path = _splice_dir(tmp_path)
    _edit_config(path, **change)
    with pytest.raises(ConfigError, match=message) as err:
        splice.load_peft(g, path)
    assert "\n" not in str(err.value)


def test_adapter_for_another_base(tmp_path):
    _, llama = captured("llama")
    path = _splice_dir(tmp_path, "gpt2", "c_attn")
    with pytest.raises(ConfigError, match="no linear layer 'transformer.h.0.attn.c_attn'"):
        splice.load_peft(llama, path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    path = _splice_dir(tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    weights[key] = torch.zeros(2, 96)
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=rf"{key} has shape \[2, 96\] but layer .* takes 64 inputs"):
        splice.load_peft(llama, path)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        splice.load_peft(llama, tmp_path / "missing")


def test_load_is_a_recorded_pass(tmp_path):
    _, g = captured("llama")
    path = _splice_dir(tmp_path)
    loaded = splice.load_peft(g, path, name="x")
    assert [h["spec"] for h in loaded.history] == [f"adapter.peft:path={path},name=x"]
    again = g.apply(f"adapter.peft:path={path},name=x")
    assert torch.equal(again.run(*g.example_inputs)["logits"], loaded.run(*g.example_inputs)["logits"])
    with pytest.raises(ConfigError, match="adapter.peft: path is required"):
        g.apply("adapter.peft")


def _write_weights(path, data: bytes):
    (path / "adapter_model.safetensors").write_bytes(data)


@pytest.mark.parametrize("edit,message", [
    (lambda p: (p / "adapter_config.json").write_text("[1, 2]"), r"adapter_config.json: must be a JSON object, got a list"),
    (lambda p: (p / "adapter_config.json").write_text("{'r': "), r"adapter_config.json: unreadable \(JSONDecodeError\)"),
    (lambda p: _write_weights(p, b"garbage, not safetensors"), r"adapter_model.safetensors: not a readable safetensors file"),
    (lambda p: _write_weights(p, (p / "adapter_model.safetensors").read_bytes()[:100]),
     r"adapter_model.safetensors: not a readable safetensors file"),
    (lambda p: _edit_config(p, r=0), r"adapter_config.json: r must be a positive integer, got 0"),
    (lambda p: _edit_config(p, r="four"), r"adapter_config.json: r must be a positive integer, got 'four'"),
    (lambda p: _edit_config(p, r=True), r"adapter_config.json: r must be a positive integer, got True"),
    (lambda p: _edit_config(p, lora_alpha=float("nan")), r"adapter_config.json: lora_alpha must be a finite number, got nan"),
    (lambda p: _edit_config(p, lora_alpha=float("inf")), r"adapter_config.json: lora_alpha must be a finite number, got inf"),
    (lambda p: _edit_config(p, lora_dropout=1.5), r"adapter_config.json: lora_dropout must be in \[0, 1\), got 1.5"),
    (lambda p: _edit_config(p, rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer, got 0"),
    (lambda p: _edit_config(p, alpha_pattern={"q_proj": "x"}), r"alpha_pattern\['q_proj'\] must be a finite number"),
])
def test_bad_peft_directories(tmp_path, edit, message):
    """Each bad directory is one ConfigError line naming the pass, the file and the key."""
    _, g = captured("llama")
    path = _splice_dir(tmp_path)
    edit(path)
    with pytest.raises(ConfigError, match=message) as err:
        splice.load_peft(g, path)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"adapter.peft: {path}")


def test_cli_run_with_peft_dir_refuses_non_peft_dir(tmp_path, capsys):
    from splice.cli import main

    rc = main(["run", str(tmp_path), "--peft", str(tmp_path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "not a PEFT adapter directory" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_run_with_peft_dir(tmp_path, capsys, llama_hf_dir):
    from splice.cli import main

    peft_dir = _splice_dir(tmp_path)
    out = tmp_path / "out"
    rc = main(["run", str(llama_hf_dir), "--peft", str(peft_dir), "-p", "adapter.fold", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    _, g = captured("llama")
    expected = splice.load_peft(g, peft_dir).apply("adapter.fold")
    back = splice.load(out)
    assert [h["pass"] for h in back.history] == ["adapter.peft", "adapter.fold"]  # the load is a recorded pass
    torch.testing.assert_close(back.run(*g.example_inputs)["logits"], expected.run(*g.example_inputs)["logits"],
                               atol=1e-5, rtol=1e-5)
