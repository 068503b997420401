"""VeRA, MiSS/Bone (balance and Bat) and AdaLoRA: the delta ops, PEFT parity both ways (outputs
<= 1e-5, equal trainable counts), PEFT's inits, zero-init exactness, fold/unfold, ONNX Runtime
parity folded and unfolded, AdaLoRA's regularizer and rank allocator against PEFT's, bad input."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import splice
from splice.errors import ConfigError
from splice.eval import zoo
from splice.passes.adapters._common import sites
from splice.passes.adapters.adalora import adalora_hook
from splice.kernels.adapters.adapter_math import bat_update
from splice.passes.adapters.bone import balance_update
from zoo_graphs import assert_one_line_error, captured, input_grid

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS = {  # method: splice spec with a non-zero update
    "vera": "adapter.vera:init=random,rank=16",
    "bone": "adapter.bone:init=random,rank=24",
    "bat": "adapter.bone:variant=bat,init=random,rank=16,targets=q_proj|down_proj",
    "mini": "adapter.bone:variant=mini,init=random,rank=16,mini_rank=8,targets=q_proj|k_proj|up_proj|down_proj",
    "adalora": "adapter.adalora:init=random,init_r=4,target_r=2",
}
ZERO = ["adapter.vera", "adapter.bone", "adapter.bone:variant=bat,rank=16,targets=q_proj|down_proj",
        "adapter.bone:variant=mini,rank=16,mini_rank=8", "adapter.adalora"]
PEFT_CONFIGS = {  # method: (zoo model, PEFT config)
    "vera": ("llama", lambda: peft.VeraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    "bone": ("bert", lambda: peft.MissConfig(r=24, target_modules=["query", "dense"])),
    "bat": ("llama", lambda: peft.MissConfig(r=16, init_weights="bat", target_modules=["q_proj", "down_proj"])),
    "mini": ("llama", lambda: peft.MissConfig(r=16, init_weights="mini", mini_r=8,
                                              target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])),
    "adalora": ("gpt2", lambda: peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=5, total_step=20,
                                                   target_modules=["c_attn", "c_fc"])),
}


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _peft_model(method, randomize=True):
    model, config = PEFT_CONFIGS[method]
    pm = _quiet(peft.get_peft_model, zoo.build(model).model, config()).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if randomize and p.requires_grad:  # random non-zero adapter weights
                p.normal_(0, 0.3 if "lora_" in n else 0.1)
    return model, pm


def _max_diff(graph, ref, zm, out):
    worst = 0.0
    for batch, seq in ((1, 5), (3, 17)):
        kw = zm.make_inputs(batch, seq, seed=batch)
        with torch.no_grad():
            want = getattr(ref(**kw), out)
        worst = max(worst, float((graph.run(**kw)[out] - want).abs().max()))
    return worst


def _adapted(method):
    """The llama graph with a non-zero adapter; AdaLoRA's N(0, 1) init (PEFT's) is weighted down
    so that the logits stay O(1) and absolute bounds mean something."""
    out = captured("llama")[1].apply(SPECS[method])
    return splice.set_adapter_weight(out, "default", 1e-3) if method == "adalora" else out


def _trainable(graph):
    return sum(p.numel() for p in splice.adapter_parameters(graph).values())


# ------------------------------------------------------------------------------ ops


def _op_cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    x, s = r(2, 5, 12), torch.tensor(0.5)
    return {
        "vera": (torch.ops.splice.vera_delta.default, (x, r(4), r(6), r(4, 16, grad=False), r(9, 4, grad=False), s)),
        "bone": (torch.ops.splice.bone_delta.default, (x, r(5, 7), s)),  # 12 % 5 != 0: padded
        "mini": (torch.ops.splice.bone_mini_delta.default, (x, r(2, 5, 6, grad=False), r(5, 3), s)),
        "bat": (torch.ops.splice.bat_linear.default, (r(2, 5, 6, grad=False), x, r(6, 12, grad=False), r(6, grad=False),
                                                       r(2, 3, 3), s)),
        "adalora": (torch.ops.splice.adalora_delta.default, (x, r(3, 12), r(3, 1), r(6, 3), s, torch.tensor(3.00001))),
    }


@pytest.mark.parametrize("method", list(SPECS))
def test_op_opcheck_and_gradients_match_the_dense_update(method):
    op, args = _op_cases()[method]
    torch.library.opcheck(op, args)
    y = op(*args)
    ins = [a for a in args if a.requires_grad]
    grads = torch.autograd.grad(y.square().sum(), ins)
    ref_fn = {"vera": lambda x, d, b, va, vb, s: b * ((d * (x @ va[:, :12].T)) @ vb[:6].T) * s,
              "bone": lambda x, blk, s: x @ balance_update(blk, 12).T * s,
              "mini": lambda x, y, blk, s: x @ balance_update(blk.repeat(1, 2), 12).T * s,
              "bat": lambda y, x, w, b, blk, s: torch.nn.functional.linear(x, w + bat_update(w, blk) * s, b),
              "adalora": lambda x, a, e, b, s, n: x @ (a * e).T @ b.T * s / n}[method]
    if ref_fn is not None:
        ref = ref_fn(*args)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), ins)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fake_impls_check_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.splice.vera_delta(torch.empty(2, 7, 8), torch.empty(4), torch.empty(5), torch.empty(4, 16),
                                        torch.empty(9, 4), torch.tensor(1.0))
        assert tuple(y.shape) == (2, 7, 5)
        with pytest.raises(Exception, match="input features 20 > vera_A's 16"):
            torch.ops.splice.vera_delta(torch.empty(3, 20), torch.empty(4), torch.empty(5), torch.empty(4, 16),
                                        torch.empty(9, 4), torch.tensor(1.0))
        with pytest.raises(Exception, match=r"E \(2, 2\) != \[r, 1\]"):
            torch.ops.splice.adalora_delta(torch.empty(3, 8), torch.empty(2, 8), torch.empty(2, 2), torch.empty(4, 2),
                                           torch.tensor(1.0), torch.tensor(2.0))


# --------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_peft_directory_round_trip(method, tmp_path):
    model, pm = _peft_model(method)
    zm, g = captured(model)
    out = g.output_names[0]
    _quiet(pm.save_pretrained, tmp_path / "peft")
    loaded = splice.load_peft(g, tmp_path / "peft")
    assert _max_diff(loaded, pm, zm, out) <= 1e-5
    assert _max_diff(g, pm, zm, out) > 1e-2  # the adapter really changes the outputs
    assert _trainable(loaded) == pm.get_nb_trainable_parameters()[0]
    splice.save_peft(loaded, tmp_path / "back")
    back = _quiet(peft.PeftModel.from_pretrained, zoo.build(model).model, tmp_path / "back").eval()
    assert _max_diff(loaded, back, zm, out) <= 1e-5


def test_vera_projections_are_peft_and_stored_once(tmp_path):
    _, pm = _peft_model("vera", randomize=False)
    _, g = captured("llama")
    ours = g.apply("adapter.vera:rank=16,targets=q_proj|v_proj|down_proj")
    for key in ("vera_A", "vera_B"):  # same generator, order and bounds as PEFT
        assert torch.equal(ours.tensor(f"adapters.default.{key}"), getattr(pm.base_model, key)["default"])
    path = "model.layers.0.self_attn.v_proj.adapters.default"
    assert torch.equal(ours.tensor(f"{path}.lambda_d"), torch.full((16,), 0.1))
    assert not ours.tensor(f"{path}.lambda_b").any()
    readers = {n.target for n in ours.gm.graph.nodes if n.op == "get_attr" and "vera_" in n.target}
    assert readers == {"adapters.default.vera_A", "adapters.default.vera_B"}  # one pair for all 6 layers
    assert ours.bytes_by_role()["adapter_frozen"] == (16 * 128 + 64 * 16) * 4


def test_adalora_after_peft_rank_allocation_loads_pruned(tmp_path):
    """A PEFT dir whose rank_pattern pruned triplets: splice loads the pruned tensors (PEFT's
    trainable count), keeps scale = alpha / init_r, and writes the same pattern back."""
    model, pm = _peft_model("adalora")
    pattern = {f"{p}.lora_E": [True, False, True, True, False, True]
               for p in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc")}
    pm.peft_config["default"].rank_pattern = pattern
    _quiet(pm.save_pretrained, tmp_path / "p")
    zm, g = captured(model)
    loaded = splice.load_peft(g, tmp_path / "p")
    ref = _quiet(peft.PeftModel.from_pretrained, zoo.build(model).model, tmp_path / "p", is_trainable=True).eval()
    assert _max_diff(loaded, ref, zm, "logits") <= 1e-5
    assert _trainable(loaded) == ref.get_nb_trainable_parameters()[0]
    splice.save_peft(loaded, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["rank_pattern"] == pattern


# ------------------------------------------------------------------ exactness, fold, export


@pytest.mark.parametrize("spec", ZERO)
def test_zero_init_leaves_outputs_unchanged_exactly(spec):
    zm, g = captured("llama")
    out = g.apply(spec)
    for inputs in input_grid(zm, g)[:2]:
        assert torch.equal(g.run(*inputs)["logits"], out.run(*inputs)["logits"])


def test_bone_balance_update_is_peft_merge():
    _, pm = _peft_model("bone")
    layer = pm.base_model.model.encoder.layer[0].attention.self.query
    w = layer.base_layer.weight.detach().clone()
    want = layer.get_delta_weight_miss("default", w.clone()) - w
    torch.testing.assert_close(balance_update(layer.miss_block["default"].detach(), 64), want, atol=1e-6, rtol=0)


def _base_weight(graph, path):
    node = next(n for n in graph.gm.graph.nodes if n.target == torch.ops.aten.linear.default
                and n.args[1].target.startswith(path + "."))
    return graph.tensor(node.args[1].target)


@pytest.mark.parametrize("method", list(SPECS))
def test_fold_then_unfold_restores_weights(method):
    zm, g = captured("llama")
    out = _adapted(method)
    folded = out.apply("adapter.fold")
    assert float((folded.run(*g.example_inputs)["logits"] - out.run(*g.example_inputs)["logits"]).abs().max()) <= 1e-4
    back = folded.apply("adapter.unfold")
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = _base_weight(out, path)
        assert float((_base_weight(folded, path) - w).abs().max()) > 1e-5  # the fold changed it
        assert float((_base_weight(back, path) - w).abs().max()) <= 1e-6
    assert {a.method for a in splice.list_adapters(back)} == {a.method for a in splice.list_adapters(out)}


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "vera" else pytest.mark.slow)
                                    for m in SPECS])  # the fast suite: one; -m slow: all (the matrix exports each)
def test_onnx_folded_and_unfolded_match_ort(method, tmp_path):
    zm, g = captured("llama")
    out = _adapted(method)
    for name, graph in (("unfolded", out), ("folded", out.apply("adapter.fold"))):
        path = splice.export_onnx(graph, tmp_path / f"{name}.onnx")
        assert splice.parity(graph, path, input_grid(zm, g)) <= 1e-4, name


# ------------------------------------------------------------------------- AdaLoRA training


def _adalora_pair(tmp_path, **schedule):
    """The same AdaLoRA adapter in PEFT (trainable) and in splice (loaded from PEFT's directory)."""
    config = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=["q_proj", "down_proj"], **schedule)
    pm = _quiet(peft.get_peft_model, zoo.build("llama").model, peft.AdaLoraConfig(**config))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    _quiet(pm.save_pretrained, tmp_path / "ada")
    graph = splice.load_peft(captured("llama")[1], tmp_path / "ada")
    return pm, graph


def _params(graph):
    return {n: p for n, p in graph.gm.named_parameters() if p.requires_grad}


def test_adalora_regularizer_equals_peft(tmp_path):
    pm, graph = _adalora_pair(tmp_path, total_step=10, orth_reg_weight=0.3)
    kw = zoo.build("llama").make_inputs(2, 7)
    pm.train()
    with_reg = pm.base_model(**kw, labels=kw["input_ids"]).loss  # AdaLoraModel.forward adds the penalty
    plain = pm.base_model.model(**kw, labels=kw["input_ids"]).loss
    hook = adalora_hook(graph)
    torch.testing.assert_close(hook.regularizer(0, 10), with_reg - plain, atol=1e-5, rtol=1e-5)
    assert adalora_hook(captured("llama")[1].apply("adapter.lora")) is None


def test_adalora_rank_allocation_equals_peft(tmp_path):
    """Same gradients -> the same triplets masked at every step of PEFT's schedule (tinit, cubic
    budget, the final mask at total - tfinal and its re-application after)."""
    total = 6
    pm, graph = _adalora_pair(tmp_path, total_step=total, tinit=1, tfinal=2, deltaT=1, beta1=0.7, beta2=0.8)
    hook = adalora_hook(graph)
    zm = zoo.build("llama")
    ours = _params(graph)
    for step in range(total):
        kw = zm.make_inputs(2, 9, seed=step)
        pm(**kw).logits.square().mean().backward()
        pm.base_model.update_and_allocate(step)
        pm.zero_grad()
        graph.gm(*(kw[n] for n in graph.input_names))[0].square().mean().backward()
        hook.after_backward(step, total)
        hook.after_step(step, total)
        for p in ours.values():
            p.grad = None
        for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            peft_e = pm.base_model.model.get_submodule(path).lora_E["default"]
            assert torch.equal(graph.tensor(f"{path}.adapters.default.E") == 0, peft_e == 0), (step, path)
    kept = sum(int((graph.tensor(f"{s.path}.adapters.default.E") != 0).sum()) for s in sites(graph))
    assert kept == 2 * 4  # target_r x layers


def test_adalora_trains_through_splice_train():
    from splice.eval.data import ByteTokenizer, builtin_text

    g = captured("llama")[1].apply("adapter.adalora:init_r=4,target_r=2,targets=q_proj|v_proj,tfinal=2")
    trained, report = splice.train(g, [builtin_text("gpl3")[:4000]], steps=6, lr=1e-2, seq_len=32, batch_size=2,
                                   tokenizer=ByteTokenizer(), progress=False)
    ranks = [int((trained.tensor(f"{s.path}.adapters.default.E") != 0).sum()) for s in sites(trained)]
    assert sum(ranks) == 2 * len(ranks) and report["history"]


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("spec,message", [
    ("adapter.bone:rank=65,targets=q_proj", r"rank 65 exceeds the in-features \(64\) of layer 'model.layers.0.self_attn.q_proj'"),
    ("adapter.bone:variant=bat,rank=24,targets=q_proj", "variant=bat needs in and out divisible by rank 24"),
    ("adapter.bone:variant=mini,mini_rank=24,rank=8,targets=q_proj",
     r"variant=mini needs out-features divisible by mini_rank 24; layer 'model.layers.0.self_attn.q_proj' has 64"),
    ("adapter.bone:variant=mini,mini_rank=0", "mini_rank must be >= 1"),
    ("adapter.adalora:init_r=40,target_r=2,targets=k_proj", r"rank 40 exceeds min\(in, out\) = 32"),
    ("adapter.adalora:init_r=4,target_r=8", "need 1 <= target_r <= init_r"),
    ("adapter.adalora:tinit=5,tfinal=5,total_step=10", "leave no budgeting phase"),
    ("adapter.vera:rank=0", "rank must be >= 1"),
])
def test_bad_configs_are_one_line(spec, message):
    assert_one_line_error([spec], message)


@pytest.mark.parametrize("spec", ["adapter.vera:rank=8", "adapter.bone:rank=8", "adapter.adalora"])
def test_duplicate_name(spec):
    _, g = captured("llama")
    with pytest.raises(ConfigError, match="already has an adapter named 'default'"):
        g.apply(spec, spec)


def test_bat_needs_a_float_base():
    _, g = captured("llama")
    with pytest.raises(ConfigError, match="no float weight for Bat"):
        g.apply("quantize.rtn:group_size=32", "adapter.bone:variant=bat,rank=16,targets=q_proj")


@pytest.mark.parametrize("method,key,bad", [
    ("vera", "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b", torch.zeros(32)),
    ("bat", "base_model.model.model.layers.0.self_attn.q_proj.miss_block", torch.zeros(2, 16, 16)),
    ("mini", "base_model.model.model.layers.0.self_attn.k_proj.miss_block", torch.zeros(16, 32)),
    ("adalora", "base_model.model.transformer.h.0.attn.c_attn.lora_A", torch.zeros(6, 96)),
])
def test_peft_dir_for_another_base_names_the_parameter(method, key, bad, tmp_path):
    model, pm = _peft_model(method, randomize=False)
    _quiet(pm.save_pretrained, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights[key] = bad
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=rf"{key} has shape {list(bad.shape)}".replace("[", r"\[")) as err:
        splice.load_peft(captured(model)[1], tmp_path)
    assert "\n" not in str(err.value)
