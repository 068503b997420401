"""Adapters: the lora_delta op, adapter.lora (inits, scaling), multi-adapter weights, fold/unfold
(float, tied and quantized bases), export (folded, unfolded, adapters as inputs), bad input."""
import onnx
import pytest
import torch
from zoo_graphs import assert_bad_option, assert_one_line_error, captured, computed_weight_graph, first_output, \
    input_grid, max_diff

import splice
from splice.runtime.adapter_inputs import with_adapter_inputs
from splice.errors import ConfigError
from splice.eval import zoo
from splice.ir.select import module_path
from splice.runtime.onnx import run_session, session

LORA = torch.ops.splice.lora_delta.default


# ----------------------------------------------------------------------------- the op


def test_lora_delta_reference_opcheck_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    a = torch.randn(4, 16, generator=g, requires_grad=True)
    b = torch.randn(8, 4, generator=g, requires_grad=True)
    scale = torch.tensor(0.75)
    y = torch.ops.splice.lora_delta(x, a, b, scale)
    ref = (x @ a.T @ b.T) * 0.75
    torch.testing.assert_close(y, ref)
    torch.library.opcheck(LORA, (x, a, b, scale))
    grads = torch.autograd.grad(y.square().sum(), (x, a, b))
    expect = torch.autograd.grad(ref.square().sum(), (x, a, b))
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_delta_fake_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = LORA(torch.empty(2, 7, 8), torch.empty(3, 8), torch.empty(5, 3), torch.tensor(1.0))
        assert tuple(y.shape) == (2, 7, 5)
        with pytest.raises(Exception, match="input features 8 != A's 9"):
            LORA(torch.empty(3, 8), torch.empty(2, 9), torch.empty(4, 2), torch.tensor(1.0))


# ----------------------------------------------------------------------- adapter.lora


@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_zero_init_leaves_outputs_unchanged_exactly(model, init):
    zm, g = captured(model)
    out = g.apply(f"adapter.lora:init={init},rank=4")
    assert out.op_counts()["splice.lora_delta"] == sum(1 for _ in g.nodes("linear")) - (model == "llama")
    for inputs in input_grid(zm, g)[:2]:
        a, b = g.run(*inputs), out.run(*inputs)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_keep_outputs_and_rewrite_base(init):
    _, g = captured("llama")
    out = g.apply(f"adapter.lora:init={init},rank=4,alpha=16,targets=q_proj|down_proj")
    path = "model.layers.0.self_attn.q_proj"
    w, a, b = (out.tensor(f"{path}.{k}") for k in ("weight", "adapters.default.A", "adapters.default.B"))
    torch.testing.assert_close(w + 4.0 * b @ a, g.tensor(f"{path}.weight"), atol=1e-5, rtol=0)
    assert float((w - g.tensor(f"{path}.weight")).abs().max()) > 1e-2  # the base really holds the residual
    assert max_diff(g, out, g.example_inputs) <= 1e-5


def test_rslora_scaling_and_report():
    _, g = captured("llama")
    out = g.apply("adapter.lora:rank=4,alpha=8,rslora=true,targets=q_proj")
    assert float(out.tensor("model.layers.0.self_attn.q_proj.adapters.default.scale")) == pytest.approx(4.0)
    report = out.history[-1]["report"]
    assert report["layers"] == 2 and report["trainable_params"] == 2 * 4 * (64 + 64)


def test_trainable_parameters_are_the_adapter_tensors_only():
    _, g = captured("llama")
    out = g.apply("adapter.lora:rank=4,targets=q_proj|v_proj")
    params = splice.adapter_parameters(out)
    assert len(params) == 8 and all(k.endswith((".A", ".B")) for k in params)
    assert {n for n, p in out.gm.named_parameters() if p.requires_grad} == set(params)
    assert out.bytes_by_role()["adapter"] == sum(p.numel() * 4 for p in params.values())
    loss = out.module()(*out.example_inputs)[0].square().mean()
    loss.backward()
    grads = {k: p.grad for k, p in params.items()}
    assert all(gr is not None for gr in grads.values())
    assert any(float(gr.abs().max()) > 0 for k, gr in grads.items() if k.endswith(".B"))
    for p in params.values():
        p.grad = None


def test_multiple_named_adapters_weight_and_switch():
    _, g = captured("llama")
    two = g.apply("adapter.lora:name=a,init=random,rank=4,targets=q_proj",
                  "adapter.lora:name=b,init=random,rank=2,targets=q_proj|v_proj")
    assert sorted((i.name, i.layer) for i in splice.list_adapters(two))[:2] == [
        ("a", "model.layers.0.self_attn.q_proj"), ("a", "model.layers.1.self_attn.q_proj")]
    only_a = g.apply("adapter.lora:name=a,init=random,rank=4,targets=q_proj")
    off = splice.deactivate_adapter(two, "b")
    assert off.op_counts() == two.op_counts()  # the graph is the same, only scales changed
    inputs = g.example_inputs
    assert max_diff(off, only_a, inputs) == 0.0
    assert max_diff(splice.activate_adapter(off, "b"), two, inputs) == 0.0
    half = splice.set_adapter_weight(only_a, "a", 0.5)
    delta = first_output(only_a, inputs) - first_output(g, inputs)
    half_delta = first_output(half, inputs) - first_output(g, inputs)
    assert 0.2 < float(half_delta.norm() / delta.norm()) < 0.8
    assert float(two.tensor("model.layers.0.self_attn.v_proj.adapters.b.scale")) == 4.0  # input untouched
    assert {(i.name, i.weight, i.active) for i in splice.list_adapters(half)} == {("a", 0.5, True)}


# ------------------------------------------------------------------------ fold / unfold


def test_fold_then_unfold_round_trip():
    zm, g = captured("llama")
    two = g.apply("adapter.lora:name=a,init=random,rank=4", "adapter.lora:name=b,init=random,rank=2,targets=v_proj")
    folded = two.apply("adapter.fold")
    assert "splice.lora_delta" not in folded.op_counts()
    assert folded.op_counts()["splice.folded_adapter"] == 14
    assert all(i.folded for i in splice.list_adapters(folded))
    for inputs in input_grid(zm, g)[:2]:
        assert max_diff(folded, two, inputs) <= 1e-5
    back = folded.apply("adapter.unfold")
    assert back.op_counts() == two.op_counts()
    assert set(back.tensors()) == set(two.tensors())
    assert max(float((back.tensor(k) - t).detach().abs().max()) for k, t in two.tensors().items()) <= 1e-6
    assert max_diff(back, two, g.example_inputs) <= 1e-5
    assert set(splice.adapter_parameters(back)) == set(splice.adapter_parameters(two))


def test_fold_named_or_active_only_and_unload():
    _, g = captured("llama")
    two = g.apply("adapter.lora:name=a,init=random,rank=4,targets=q_proj",
                  "adapter.lora:name=b,init=random,rank=4,targets=q_proj")
    off = splice.deactivate_adapter(two, "b")
    folded = off.apply("adapter.fold")
    state = {(i.name, i.folded) for i in splice.list_adapters(folded)}
    assert state == {("a", True), ("b", False)}
    assert max_diff(folded, off, g.example_inputs) <= 1e-5
    only_b = two.apply("adapter.fold:name=b,keep=false")
    assert {(i.name, i.folded) for i in splice.list_adapters(only_b)} == {("a", False)}
    assert "splice.folded_adapter" not in only_b.op_counts()
    with pytest.raises(ConfigError, match="adapter 'a' is folded"):
        splice.set_adapter_weight(folded, "a", 2.0)


def test_fold_untied_lm_head_restores_the_tie_exactly():
    _, g = captured("llama")  # lm_head shares the embedding table
    out = g.apply("adapter.lora:init=random,rank=4,targets=lm_head")
    folded = out.apply("adapter.fold")
    emb = next(n for n in folded.nodes("embedding")).args[0].target
    torch.testing.assert_close(folded.tensor(emb), g.tensor(emb), atol=0, rtol=0)  # the embedding is untouched
    assert max_diff(folded, out, g.example_inputs) <= 1e-5
    back = folded.apply("adapter.unfold")
    head = next(n for n in back.nodes("linear") if module_path(n) == "lm_head")
    assert head.args[1].target == emb  # tied again, exactly
    assert max_diff(back, out, g.example_inputs) == 0.0


def test_save_load_keeps_adapters_and_fold_records(tmp_path):
    _, g = captured("gpt2")
    out = splice.set_adapter_weight(g.apply("adapter.lora:init=random,rank=4"), "default", 0.25)
    folded = out.apply("adapter.fold:name=default")
    for graph, name in ((out, "a"), (folded, "f")):
        graph.save(tmp_path / name)
        back = splice.load(tmp_path / name)
        assert splice.list_adapters(back) == splice.list_adapters(graph)
    unfolded = splice.load(tmp_path / "f").apply("adapter.unfold")
    assert max_diff(unfolded, out, g.example_inputs) <= 1e-5


def test_every_zoo_model_lora_fold_unfold():
    """What the registry tests would run for adapter.fold/unfold given their ``requires``."""
    for model in zoo.ZOO_NAMES:
        _, g = captured(model)
        lora = g.apply("adapter.lora:init=random,rank=4")
        res = splice.Pipeline(["adapter.fold", "adapter.unfold"]).run(lora)
        assert res.reports[0]["report"]["folded"] >= 1
        assert max_diff(res.graph, lora, g.example_inputs) <= 1e-5, model


# ------------------------------------------------------------------------ quantized base


def test_lora_on_quantized_base_folds_requantized_and_unfolds_exactly(tmp_path):
    zm, g = captured("llama")
    q = g.apply("quantize.rtn:bits=4,group_size=32")
    ql = q.apply("adapter.lora:init=random,rank=4,targets=q_proj|v_proj")
    assert ql.op_counts()["splice.qlinear"] == 15 and ql.op_counts()["splice.lora_delta"] == 4
    assert max_diff(ql, q, g.example_inputs) > 1e-2
    folded = ql.apply("adapter.fold")
    layer = folded.history[-1]["report"]["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["requant_sqnr_db"] > 10 and layer["requant_max_abs_err"] > 0
    assert folded.op_counts()["splice.qlinear"] == 15
    back = folded.apply("adapter.unfold")
    assert set(back.tensors()) == set(ql.tensors())
    assert all(torch.equal(back.tensor(k), t) for k, t in ql.tensors().items())  # exact: originals were kept
    path = splice.export_onnx(ql, tmp_path / "ql.onnx")
    assert splice.parity(ql, path, input_grid(zm, g)) <= 1e-4


# -------------------------------------------------------------------------------- export


def test_export_unfolded_folded_and_adapter_inputs(tmp_path):
    zm, g = captured("gpt2")
    out = g.apply("adapter.lora:init=random,rank=4,targets=c_attn|c_fc")
    grid = input_grid(zm, g)
    unfolded = splice.export_onnx(out, tmp_path / "u.onnx")
    names = {i.name for i in onnx.load(unfolded).graph.initializer}
    assert {t for t in out.tensors() if t.endswith((".A", ".B"))} <= names
    assert splice.parity(out, unfolded, grid) <= 1e-4
    folded = out.apply("adapter.fold")
    fpath = splice.export_onnx(folded, tmp_path / "f.onnx")
    fmodel = onnx.load(fpath)
    assert not any("adapters" in i.name for i in fmodel.graph.initializer)
    gemms = [sum(n.op_type == "Gemm" for n in onnx.load(p).graph.node) for p in (unfolded, fpath)]
    assert gemms[0] - gemms[1] == 2 * 4  # each adapter's two Gemms are gone: no overhead
    assert splice.parity(folded, fpath, grid) <= 1e-4
    ipath = splice.export_onnx(out, tmp_path / "i.onnx", adapter_inputs=True)
    assert splice.parity(out, ipath, grid) <= 1e-4  # adapter inputs default to the stored values
    swapped = splice.set_adapter_weight(out, "default", -0.5)
    fed = with_adapter_inputs(swapped)
    sess = session(ipath)
    n = len(g.input_names)
    for inputs in grid[:2]:
        got = run_session(sess, fed, tuple(inputs) + fed.example_inputs[n:])["logits"]
        assert abs(got - swapped.run(*inputs)["logits"].numpy()).max() <= 1e-4


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("specs,message", [
    (["adapter.lora:rank=65"], r"rank 65 exceeds min\(in, out\) = 64 of layer 'model.layers.0.self_attn.q_proj'"),
    (["adapter.lora:targets=model.norm"], "targets 'model.norm' matched no linear layer"),
    (["adapter.lora:targets=embedding"], "matched no linear layer"),
    (["adapter.lora:targets=q_proj", "adapter.lora:targets=q_proj"], "already has an adapter named 'default'"),
    (["adapter.unfold"], "adapter.unfold: requires adapter.fold earlier"),  # the Pipeline's requires check
    (["adapter.fold"], "adapter.fold: requires adapter .a pass providing it"),
    (["adapter.lora:targets=q_proj", "adapter.fold:keep=false", "adapter.unfold"], "nothing to unfold"),
    (["adapter.lora:targets=q_proj", "adapter.fold", "adapter.fold"], "no unfolded adapter"),
    (["adapter.lora:targets=q_proj", "adapter.fold:name=zzz"], "no adapter named 'zzz'"),
    (["adapter.lora:targets=q_proj", "adapter.fold", "quantize.rtn", "adapter.unfold"], "rewritten after adapter.fold"),
])
def test_bad_input_is_one_line(specs, message):
    assert_one_line_error(specs, message)


@pytest.mark.parametrize("spec,message", [
    ("adapter.lora:rank=0", "rank must be >= 1"), ("adapter.lora:dropout=1.5", "dropout must be in"),
    ("adapter.lora:name=a.b", "name must be an identifier"), ("adapter.lora:init=svd", "init must be one of"),
])
def test_bad_options(spec, message):
    assert_bad_option(spec, message)


def test_unfold_order_on_quantized_base_and_unknown_names():
    _, g = captured("llama")
    q = g.apply("quantize.rtn", "adapter.lora:name=a,init=random,targets=q_proj",
                "adapter.lora:name=b,init=random,targets=q_proj", "adapter.fold:name=a", "adapter.fold:name=b")
    with pytest.raises(ConfigError, match="unfold 'b' first"):
        q.apply("adapter.unfold:name=a")
    assert len(splice.list_adapters(q.apply("adapter.unfold:name=b"))) == 4
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        splice.deactivate_adapter(q, "c")


def test_target_without_a_stored_weight():
    g = computed_weight_graph()
    with pytest.raises(ConfigError, match="adapter.lora: layer '.*' has no stored weight"):
        g.apply("adapter.lora:targets=linear")
