"""Adapters that read the base layer: adapter.dora, adapter.ia3, adapter.ssf. Their ops (opcheck,
gradients), zero-init exactness, exact fold/unfold (also mixed with LoRA), ONNX parity folded and
unfolded, PEFT parity (DoRA, IA3: load what PEFT saved, same outputs and trainable counts, save back
and PEFT loads it), and bad input."""
import warnings

import pytest
import torch
from zoo_graphs import assert_bad_option, assert_one_line_error, captured, computed_weight_graph, input_grid, max_diff

import splice
from splice.errors import ConfigError
from splice.eval import zoo
from splice.kernels.adapters import base_deltas

peft = pytest.importorskip("peft")
ops = torch.ops.splice
RANDOM = {"dora": "adapter.dora:init=random,rank=4,targets=q_proj|v_proj|down_proj",
          "ia3": "adapter.ia3:init=random,targets=q_proj|v_proj|down_proj,feedforward=down_proj",
          "ssf": "adapter.ssf:init=random,targets=q_proj|v_proj|down_proj"}


# ----------------------------------------------------------------------------- the ops


def _op_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, w, b = r(2, 5, 16), r(8, 16), r(8)
    y = torch.nn.functional.linear(x, w, b)
    dora_args = (x, y, w, b, r(4, 16), r(8, 4), r(8).abs() + 1, torch.tensor(0.5), torch.tensor(0.75))
    return [
        (ops.dora_delta.default, dora_args, (0, 1, 4, 5, 6), base_deltas.dora_forward),
        (ops.ia3_scale.default, (y, r(8), torch.tensor(0.5)), (0, 1), lambda y, l, s: y * (1 + s * (l - 1))),
        (ops.ia3_ff_linear.default, (y, x, w, b, r(16), torch.tensor(0.5)), (1, 4),
         lambda y, x, w, b, l, s: torch.nn.functional.linear(x * (1 + s * (l - 1)), w, b)),
        (ops.ssf_delta.default, (y, r(8), r(8), torch.tensor(0.5)), (0, 1, 2), base_deltas.scale_shift_forward),
    ]


@pytest.mark.parametrize("case", range(4))
def test_ops_opcheck_and_gradients(case):
    op, args, trained, reference = _op_cases()[case]
    torch.library.opcheck(op, args)
    leaves = [a.clone().requires_grad_(i in trained) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    out = op(*leaves)
    grads = torch.autograd.grad(out.square().sum(), [leaves[i] for i in trained])
    ref_leaves = [a.clone().requires_grad_(i in trained) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    ref = reference(*ref_leaves)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    expect = torch.autograd.grad(ref.square().sum(), [ref_leaves[i] for i in trained])
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dora_op_is_the_decomposed_weight_and_norm_is_detached():
    _, args, _, _ = _op_cases()[0]
    x, y, w, b, a, bb, m, s, g = args
    adapted = w + s * bb @ a
    direction = adapted / adapted.norm(dim=1, keepdim=True)
    torch.testing.assert_close(y + ops.dora_delta(*args), y + g * (torch.nn.functional.linear(x, m[:, None] * direction, b) - y),
                               atol=1e-5, rtol=1e-5)
    a = a.clone().requires_grad_()
    (ga,) = torch.autograd.grad(ops.dora_delta(x, y, w, b, a, bb, m, s, g).sum(), a)
    lora_only = (g * m / adapted.norm(dim=1) * s)[None, :] * torch.ones(10, 8)  # the gradient through B A x only
    torch.testing.assert_close(ga, (lora_only @ bb).T @ x.reshape(10, 16), atol=1e-4, rtol=1e-4)


def test_fake_impls_check_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        e = torch.empty
        assert ops.dora_delta(e(2, 7, 16), e(2, 7, 8), e(8, 16), None, e(4, 16), e(8, 4), e(8), e(()), e(())).shape == (2, 7, 8)
        with pytest.raises(Exception, match="magnitude must be"):
            ops.dora_delta(e(2, 16), e(2, 8), e(8, 16), None, e(4, 16), e(8, 4), e(9), e(()), e(()))
        with pytest.raises(Exception, match="vectors must be \\[8\\]"):
            ops.ssf_delta(e(3, 8), e(8), e(7), e(()))
        with pytest.raises(Exception, match="l must be \\[in\\]"):
            ops.ia3_ff_linear(e(3, 8), e(3, 16), e(8, 16), None, e(8), e(()))


# ---------------------------------------------------------------- exactness, fold / unfold


@pytest.mark.parametrize("spec", ["adapter.dora:rank=4", "adapter.ia3:feedforward=mlp.*|output.dense", "adapter.ssf"])
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_zero_init_leaves_outputs_unchanged_exactly(spec, model):
    zm, g = captured(model)
    out = g.apply(spec)
    assert sum(k.startswith("splice.") for k in out.op_counts()) >= 1
    for inputs in input_grid(zm, g)[:2]:
        a, b = g.run(*inputs), out.run(*inputs)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "dora" else pytest.mark.slow)
                                    for m in RANDOM])  # the fast suite: DoRA (reads the base); -m slow: all three
def test_fold_unfold_exact_and_onnx_parity(method, tmp_path):
    zm, g = captured("llama")
    out = g.apply(RANDOM[method])
    grid = input_grid(zm, g)
    assert max_diff(out, g, g.example_inputs) > 1e-2
    folded = out.apply("adapter.fold")
    assert not any(k in folded.op_counts() for k in ("splice.dora_delta", "splice.ia3_scale", "splice.ssf_delta"))
    for inputs in grid[:2]:
        assert max_diff(folded, out, inputs) <= 1e-5
    back = folded.apply("adapter.unfold")
    assert back.op_counts() == out.op_counts() and set(back.tensors()) == set(out.tensors())
    assert max(float((back.tensor(k) - t).detach().abs().max()) for k, t in out.tensors().items()) <= 1e-6
    assert max_diff(back, out, g.example_inputs) == 0.0
    for graph, name in ((out, "unfolded"), (folded, "folded")):
        path = splice.export_onnx(graph, tmp_path / f"{name}.onnx")
        assert splice.parity(graph, path, grid) <= 1e-4, name


def test_ssf_fold_gives_a_bias_to_a_layer_without_one_and_unfold_removes_it():
    _, g = captured("llama")  # llama's linears have no bias
    out = g.apply("adapter.ssf:init=random,targets=q_proj")
    folded = out.apply("adapter.fold")
    q = next(n for n in folded.nodes("linear") if n.args[1].target.startswith("model.layers.0.self_attn.q_proj"))
    bias = folded.tensor(q.args[2].target)
    torch.testing.assert_close(bias, out.tensor("model.layers.0.self_attn.q_proj.adapters.default.beta"))
    gamma = out.tensor("model.layers.0.self_attn.q_proj.adapters.default.gamma")
    torch.testing.assert_close(folded.tensor(q.args[1].target), gamma[:, None] * g.tensor("model.layers.0.self_attn.q_proj.weight"))
    back = folded.apply("adapter.unfold")
    assert all(len(n.args) == 2 for n in back.nodes("linear"))
    assert set(back.tensors()) == set(out.tensors())


def test_mixed_chain_folds_together_and_unfolds_in_order():
    _, g = captured("llama")
    chain = g.apply("adapter.lora:name=a,init=random,rank=2,targets=q_proj", RANDOM["dora"].replace("rank=4", "name=d,rank=4"),
                    "adapter.ssf:name=s,init=random,targets=q_proj")
    everything = chain.apply("adapter.fold")
    assert max_diff(everything, chain, g.example_inputs) <= 1e-5
    back = everything.apply("adapter.unfold")
    assert max_diff(back, chain, g.example_inputs) <= 1e-6
    assert all(torch.equal(back.tensor(k), t) for k, t in chain.tensors().items() if k.endswith(".weight"))
    staged = chain.apply("adapter.fold:name=a", "adapter.fold:name=s")  # ssf folded onto W + ΔW_a
    with pytest.raises(ConfigError, match="unfold 's' first"):
        staged.apply("adapter.unfold:name=a")
    restored = staged.apply("adapter.unfold:name=s", "adapter.unfold:name=a")
    assert all(torch.equal(restored.tensor(k), t) for k, t in chain.tensors().items() if k.endswith(".weight"))
    assert max_diff(restored, chain, g.example_inputs) <= 1e-6  # DoRA reads the restored weight again


def test_ia3_recomputes_the_layer_at_the_head_of_the_chain():
    """IA3 computes ``y·l`` / ``linear(x·l, W)`` itself (PEFT's operations, bit for bit), ahead of
    additive adapters on the same layer, which still read the base output; one per layer."""
    _, g = captured("llama")
    both = g.apply(RANDOM["ia3"], "adapter.lora:name=a,init=random,rank=2,targets=q_proj|down_proj")
    x = g.example_inputs
    assert max_diff(both.apply("adapter.fold"), both, x) <= 1e-5
    assert max_diff(both.apply("adapter.fold:name=default"), both, x) <= 1e-5  # the LoRA deltas stay unfolded
    assert max_diff(splice.deactivate_adapter(both, "a"), g.apply(RANDOM["ia3"]), x) == 0.0
    counts = both.op_counts()
    assert counts["splice.ia3_scale"] == 4 and counts["splice.ia3_ff_linear"] == 2 and counts["splice.lora_delta"] == 4
    with pytest.raises(ConfigError, match="already has adapter 'default' \\(ia3\\), which recomputes the layer too") as err:
        both.apply("adapter.ia3:name=b,targets=q_proj")
    assert "\n" not in str(err.value)


def test_trainable_tensors_weight_and_switch():
    _, g = captured("llama")
    out = g.apply(RANDOM["dora"], RANDOM["ssf"].replace("ssf:", "ssf:name=s,"))
    params = splice.adapter_parameters(out)
    assert {k.rsplit(".", 1)[1] for k in params} == {"A", "B", "magnitude", "gamma", "beta"}
    assert {n for n, p in out.gm.named_parameters() if p.requires_grad} == set(params)
    out.module()(*out.example_inputs)[0].square().mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in params.values())
    for p in params.values():
        p.grad = None
    off = splice.deactivate_adapter(splice.deactivate_adapter(out, "default"), "s")
    assert max_diff(off, g, g.example_inputs) == 0.0


# ------------------------------------------------------------------------ PEFT parity

PEFT_CASES = {  # model: (target_modules, feedforward_modules)
    "llama": (["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "c_proj", "c_fc"], ["c_fc"]),  # Conv1D
    "bert": (["query", "value", "intermediate.dense", "output.dense"], ["output.dense"]),
}


def _peft_model(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(zoo.build(model).model, config).eval()


def _peft_from_dir(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(zoo.build(model).model, path).eval()


def _assert_matches(graph, pm, zm, tol=1e-5):
    for batch, seq in ((1, 5), (3, 17)):
        kw = zm.make_inputs(batch, seq, seed=batch)
        with torch.no_grad():
            ref = pm(**kw)
        for name, value in graph.run(**kw).items():
            assert float((value - getattr(ref, name)).abs().max()) <= tol, name


def _config(method, model):
    targets, ff = PEFT_CASES[model]
    if method == "dora":
        return peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_dora=True, init_lora_weights=False)
    return peft.IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False)


@pytest.mark.parametrize("model", list(PEFT_CASES))
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_peft_parity_round_trip(method, model, tmp_path):
    zm, g = captured(model)
    pm = _peft_model(model, _config(method, model))
    with torch.no_grad():  # a magnitude that is not the initial norm
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(1)))
    pm.save_pretrained(tmp_path / "peft")
    loaded = splice.load_peft(g, tmp_path / "peft")
    _assert_matches(loaded, pm, zm)
    assert max_diff(loaded, g, g.example_inputs) > 1e-2
    assert sum(p.numel() for p in splice.adapter_parameters(loaded).values()) == pm.get_nb_trainable_parameters()[0]
    splice.save_peft(loaded, tmp_path / "back")
    _assert_matches(loaded, _peft_from_dir(model, tmp_path / "back"), zm)
    _assert_matches(splice.load_peft(g, tmp_path / "back").apply("adapter.fold"), pm, zm)


def test_ia3_weight_goes_into_the_saved_vector(tmp_path):
    zm, g = captured("llama")
    half = splice.set_adapter_weight(g.apply(RANDOM["ia3"]), "default", 0.5)
    splice.save_peft(half, tmp_path / "p")
    _assert_matches(half, _peft_from_dir("llama", tmp_path / "p"), zm)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", ["dora", "ia3", "ssf"])
def test_target_without_a_stored_weight_and_duplicate_name(method):
    g = computed_weight_graph()
    with pytest.raises(ConfigError, match=f"adapter.{method}: layer '.*' has no stored weight") as err:
        g.apply(f"adapter.{method}:targets=linear")
    assert "\n" not in str(err.value)
    _, llama = captured("llama")
    with pytest.raises(ConfigError, match=f"adapter.{method}: layer '.*q_proj' already has an adapter named 'default'"):
        llama.apply(f"adapter.{method}:targets=q_proj", f"adapter.{method}:targets=q_proj")


@pytest.mark.parametrize("specs,message", [
    (["quantize.rtn", "adapter.dora:targets=q_proj"], "has no float weight for DoRA to read"),
    (["quantize.rtn", "adapter.ia3:targets=down_proj,feedforward=down_proj"], "has no float weight for IA3"),
    (["quantize.rtn", "adapter.ssf:init=random,targets=q_proj", "adapter.fold"], "cannot fold ssf"),
    (["adapter.ia3:targets=q_proj,feedforward=down_proj"], "feedforward layer '.*down_proj' is not among the targets"),
    (["adapter.dora:rank=65"], r"rank 65 exceeds min\(in, out\) = 64"),
])
def test_graph_dependent_errors_are_one_line(specs, message):
    assert_one_line_error(specs, message)


@pytest.mark.parametrize("spec,message", [
    ("adapter.dora:init=pissa", "init must be default, gaussian or random"), ("adapter.ia3:feedforward=re:(", "bad regex"),
    ("adapter.ssf:init=zeros", "init must be one of"), ("adapter.dora:rank=0", "rank must be >= 1"),
])
def test_bad_options(spec, message):
    assert_bad_option(spec, message)


def _peft_dir(tmp_path, method):
    _, g = captured("llama")
    return splice.save_peft(g.apply(RANDOM[method]), tmp_path / method)


@pytest.mark.parametrize("method,change,message", [
    ("dora", {"lora_bias": True}, "lora_bias is not supported"),
    ("dora", {"use_qalora": True}, "QA-LoRA"),
    ("ia3", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_unsupported_peft_options(tmp_path, method, change, message):
    import json

    _, g = captured("llama")
    path = _peft_dir(tmp_path, method)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=message) as err:
        splice.load_peft(g, path)
    assert "\n" not in str(err.value)


def test_peft_directory_for_another_base_and_unrepresentable_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    _, g = captured("llama")
    path = _peft_dir(tmp_path, "dora")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    weights = load_file(path / "adapter_model.safetensors")
    weights[key] = torch.ones(96)
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=rf"{key} has shape \[96\], expected \[64\]"):
        splice.load_peft(g, path)
    half = splice.set_adapter_weight(g.apply(RANDOM["dora"]), "default", 0.5)
    with pytest.raises(ConfigError, match="has weight 0.5; PEFT's DoRA has none"):
        splice.save_peft(half, tmp_path / "x")
    with pytest.raises(ConfigError, match="mixes methods"):
        splice.save_peft(g.apply(RANDOM["dora"], "adapter.lora:targets=k_proj"), tmp_path / "y")
    with pytest.raises(ConfigError, match="is ssf, which has no PEFT format"):
        splice.save_peft(g.apply(RANDOM["ssf"]), tmp_path / "z")
