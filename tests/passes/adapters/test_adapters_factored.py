"""The adapters PEFT lacks: NOLA, SVFit, SORSA, FLoRA, TeRA. Per method: zero-effect init, fold /
unfold, ONNX (folded and unfolded) against ORT, the defining property, bad input; plus the ops."""
import pytest
import torch
from zoo_graphs import assert_bad_option, assert_one_line_error, captured, computed_weight_graph, input_grid, max_diff

import splice
from splice.errors import ConfigError
from splice.eval.data import ByteTokenizer, builtin_text
from splice.passes.adapters._common import sites
from splice.passes.adapters.sorsa import orthonormal_penalty
from splice.train import train
from splice.ir.train_hooks import make_hooks

CASES = {  # method: (zoo model, spec)
    "nola": ("llama", "adapter.nola:rank=4,num_basis=16"),
    "svfit": ("llama", "adapter.svfit:rank=4"),
    "sorsa": ("llama", "adapter.sorsa:rank=4"),
    "flora": ("cnn", "adapter.flora:rank=4"),
    "tera": ("llama", "adapter.tera:rank=8"),
}


def _perturb(graph, seed=0, size=0.1):
    """Move every trainable adapter tensor (as training would): a non-zero update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in splice.adapter_parameters(graph).values():
            p.add_(size * torch.randn(p.shape, generator=gen))
    return graph


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, spec = CASES[request.param]
    zm, g = captured(model)
    return request.param, zm, g, g.apply(spec)


# ------------------------------------------------------------------------------ contract


def test_zero_effect_init(case):
    method, zm, g, out = case
    assert {s.method.name for s in sites(out)} == {method}
    for inputs in input_grid(zm, g)[:2]:
        a, b = g.run(*inputs), out.run(*inputs)
        if method == "sorsa":  # the base holds W - U S Vh: equal up to float rounding
            assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
        else:
            assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m in ("nola", "flora") else pytest.mark.slow)
                                    for m in CASES])  # the fast suite: a linear and a conv one; the matrix exports each
def test_fold_unfold_and_onnx(method, tmp_path):
    zm, g = captured(CASES[method][0])
    trained = _perturb(g.apply(CASES[method][1]))  # a fresh adapter: the fixture's stays at init
    grid = input_grid(zm, g)
    assert max_diff(trained, g, grid[0]) > 1e-3
    folded = trained.apply("adapter.fold")
    assert not sites(folded)
    for inputs in grid[:2]:
        assert max_diff(folded, trained, inputs) <= 1e-5
    back = folded.apply("adapter.unfold")
    assert set(back.tensors()) == set(trained.tensors())
    assert max(float((back.tensor(k) - t).detach().abs().max()) for k, t in trained.tensors().items()) <= 1e-6
    for graph, name in ((trained, "unfolded"), (folded, "folded")):
        path = splice.export_onnx(graph, tmp_path / f"{name}.onnx")
        assert splice.parity(graph, path, grid) <= 1e-4, name


# ----------------------------------------------------------------------- defining properties


def test_nola_trains_only_the_basis_coefficients():
    _, g = captured("llama")
    out = g.apply("adapter.nola:rank=4,num_basis=16,targets=q_proj|v_proj|down_proj")
    params = splice.adapter_parameters(out)
    assert sum(p.numel() for p in params.values()) == 6 * 2 * 16  # 6 layers x (alpha, beta) x k
    assert out.history[-1]["report"]["trainable_params"] == 6 * 2 * 16
    # each basis is stored once per shape: A [k, r, in] for in = 64, 128; B [k, out, r] for out = 64, 32
    bases = {t for t, role in out.param_roles().items() if role == "adapter_frozen"}
    assert len(bases) == 4
    assert out.bytes_by_role()["adapter_frozen"] == 4 * 16 * 4 * (64 + 128 + 64 + 32)
    again = g.apply("adapter.nola:rank=4,num_basis=16,targets=q_proj|v_proj|down_proj")  # regenerated from the seed
    assert all(torch.equal(out.tensor(t), again.tensor(t)) for t in bases)


def test_svfit_trains_singular_values_within_the_top_subspace():
    _, g = captured("llama")
    out = g.apply("adapter.svfit:rank=4,targets=q_proj")
    params = splice.adapter_parameters(out)
    assert all(k.endswith(".ds") for k in params) and sum(p.numel() for p in params.values()) == 2 * 4
    loss = out.module()(*g.example_inputs)[0].square().mean()
    loss.backward()
    with torch.no_grad():  # one (normalized) gradient step on the singular values
        for p in params.values():
            p -= 0.1 * p.grad / p.grad.norm()
            p.grad = None
    folded = out.apply("adapter.fold:keep=false")
    path = "model.layers.0.self_attn.q_proj.weight"
    w, dw = g.tensor(path), folded.tensor(path) - g.tensor(path)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    u, v = u[:, :4], vh[:4].T
    assert float(dw.norm()) > 1e-4
    assert float((dw - u @ (u.T @ dw)).norm()) <= 1e-5 * float(dw.norm()) + 1e-7  # columns in span(U_r)
    assert float((dw - (dw @ v) @ v.T).norm()) <= 1e-5 * float(dw.norm()) + 1e-7  # rows in span(V_r)
    assert torch.linalg.matrix_rank(dw, atol=1e-6 * float(dw.norm())) <= 4


def test_sorsa_residual_base_and_regularizer():
    _, g = captured("llama")
    out = g.apply("adapter.sorsa:rank=4,gamma=0.5,targets=q_proj")
    path = "model.layers.0.self_attn.q_proj"
    t = {k: out.tensor(f"{path}.adapters.default.{k}") for k in ("U", "S", "Vh")}
    torch.testing.assert_close(out.tensor(f"{path}.weight") + (t["U"] * t["S"]) @ t["Vh"],
                               g.tensor(f"{path}.weight"), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in splice.adapter_parameters(out).values()) == 2 * 4 * (64 + 64 + 1)
    (hook,) = make_hooks(out)
    assert float(hook.regularizer(0, 1)) <= 1e-10  # singular vectors are orthonormal at init
    u = (t["U"] + 0.2 * torch.randn(t["U"].shape, generator=torch.Generator().manual_seed(0))).requires_grad_()
    before = orthonormal_penalty(u, t["Vh"])
    (grad,) = torch.autograd.grad(before, u)
    after = orthonormal_penalty(u.detach() - 0.05 * grad, t["Vh"])
    assert float(before) > 1e-2 and float(after) < 0.7 * float(before)  # pulled back toward orthonormal
    assert make_hooks(g.apply("adapter.sorsa:gamma=0,targets=q_proj")) == []


def test_sorsa_regularizer_in_training():
    """Same data and steps: the regularized run ends with more orthonormal singular vectors."""
    _, g = captured("llama")
    text = builtin_text("gpl3")[:4000]
    penalties = {}
    for gamma in (0.0, 1.0):
        out = g.apply(f"adapter.sorsa:rank=4,gamma={gamma},targets=q_proj|v_proj")
        trained, _ = train(out, [text], steps=4, lr=2e-2, seq_len=32, batch_size=2,
                                        tokenizer=ByteTokenizer(), progress=False)
        with torch.no_grad():
            penalties[gamma] = sum(float(orthonormal_penalty(*(s.tensors(trained)[k] for k in ("U", "Vh"))))
                                   for s in sites(trained))
    assert penalties[1.0] < 0.5 * penalties[0.0], penalties


def test_flora_tucker_update_on_regular_and_depthwise_convs():
    _, g = captured("cnn")
    out = _perturb(g.apply("adapter.flora:rank=4"))
    by_path = {s.path: s for s in sites(out)}
    dw = by_path["blocks.0.dw"].method.delta_weight(by_path["blocks.0.dw"].tensors(out))
    assert dw.shape == (32, 1, 3, 3)  # depthwise: the update keeps the groups' shape
    t = by_path["blocks.0.dw"].tensors(out)
    assert (t["core"].shape, t["U_in"].shape) == ((4, 1, 3, 3), (1, 1))
    stem = by_path["stem.0"].tensors(out)  # 3 input channels: the in-mode rank is capped at 3
    assert stem["core"].shape == (4, 3, 3, 3)
    params = splice.adapter_parameters(out)
    expected = sum(t.numel() for s in sites(out) for k, t in s.tensors(out).items() if k != "scale")
    assert sum(p.numel() for p in params.values()) == expected == out.history[-1]["report"]["trainable_params"]
    assert (4 * 3 * 3 * 3 + 32 * 4 + 3 * 3 + 3 * 3 + 3 * 3) == sum(v.numel() for k, v in stem.items() if k != "scale")
    low = g.apply("adapter.flora:rank=4,kernel_rank=1,targets=blocks.0.dw")
    assert sites(low)[0].tensors(low)["core"].shape == (4, 1, 1, 1)


def test_tera_rank_is_high_at_vector_parameter_counts():
    _, g = captured("llama")
    out = _perturb(g.apply("adapter.tera:rank=8,targets=q_proj"), size=1.0)
    params = splice.adapter_parameters(out)
    assert all(k.endswith(".lam") for k in params)
    count = sum(p.numel() for p in params.values()) // 2  # per layer: 8 per mode of 8x8x8x8
    assert count == 4 * 8
    s = sites(out)[0]
    dw = s.method.delta_weight(s.tensors(out))
    rank = int(torch.linalg.matrix_rank(dw))
    lora_rank = count // (64 + 64)  # what LoRA reaches with the same number of trainable values
    assert rank == 64 and lora_rank == 0  # full rank from 32 numbers
    shared = [t for t, role in out.param_roles().items() if role == "adapter_frozen"]
    assert len(shared) == 5  # core + 4 factors, one set for both q_proj layers


@pytest.mark.parametrize("spec", ["adapter.svfit:rank=4", "adapter.nola:rank=4,num_basis=8", "adapter.tera:rank=8"])
def test_on_a_quantized_base(spec):
    """QLoRA-style: the adapter sits beside splice::qlinear (SVFit reads the dequantized weight);
    folding re-quantizes, unfolding restores the packed tensors exactly."""
    _, g = captured("llama")
    q = g.apply("quantize.rtn:bits=4,group_size=32")
    out = q.apply(f"{spec},targets=q_proj|v_proj")
    assert max_diff(out, q, g.example_inputs) == 0.0
    trained = _perturb(out)
    folded = trained.apply("adapter.fold")
    layer = folded.history[-1]["report"]["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["requant_sqnr_db"] > 10
    back = folded.apply("adapter.unfold")
    assert all(torch.equal(back.tensor(k), t) for k, t in trained.tensors().items())


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("model,specs,message", [
    ("llama", ["adapter.nola:rank=65"], r"adapter.nola: rank 65 exceeds min\(in, out\) = 64 of layer"),
    ("llama", ["adapter.svfit:rank=65"], "adapter.svfit: rank 65 exceeds"),
    ("llama", ["adapter.sorsa:rank=33,targets=k_proj"], r"rank 33 exceeds min\(in, out\) = 32 of layer 'model.layers.0"),
    ("llama", ["adapter.tera:rank=65"], "adapter.tera: rank 65 exceeds"),
    ("cnn", ["adapter.flora:rank=10,targets=blocks.0.dw"], r"rank 10 exceeds min\(in, out\) = 9 of layer 'blocks.0.dw'"),
    ("llama", ["adapter.flora"], "adapter.flora: targets 'conv' matched no conv layer"),
    ("cnn", ["adapter.flora:targets=fc"], "matched no conv layer"),
    ("llama", ["adapter.nola:targets=q_proj", "adapter.nola:targets=q_proj"], "already has an adapter named 'default'"),
    ("llama", ["adapter.svfit:targets=q_proj", "adapter.tera:targets=q_proj"], "already has an adapter named 'default'"),
    ("cnn", ["adapter.flora", "adapter.flora:targets=stem.0"], "layer 'stem.0' already has an adapter named"),
    ("llama", ["quantize.rtn", "adapter.sorsa:targets=q_proj"], "is quantized; SORSA rewrites the base weight"),
])
def test_bad_input_is_one_line(model, specs, message):
    assert_one_line_error(specs, message, model)


@pytest.mark.parametrize("spec,message", [
    ("adapter.nola:num_basis=0", "num_basis must be >= 1"), ("adapter.svfit:rank=0", "rank must be >= 1"),
    ("adapter.sorsa:gamma=-1", "gamma must be >= 0"), ("adapter.flora:kernel_rank=-1", "kernel_rank must be >= 0"),
    ("adapter.tera:alpha=0", "alpha must be > 0"), ("adapter.tera:name=a.b", "name must be an identifier"),
])
def test_bad_options(spec, message):
    assert_bad_option(spec, message)


@pytest.mark.parametrize("method", ["nola", "svfit", "sorsa", "tera"])
def test_target_without_a_stored_weight(method):
    g = computed_weight_graph()
    with pytest.raises(ConfigError, match=f"adapter.{method}: layer '.*' has no stored weight"):
        g.apply(f"adapter.{method}:rank=2,targets=linear")


# ------------------------------------------------------------------------------------- ops


def _op_cases():
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, scale = r(1, 3, 16), torch.tensor(0.5, dtype=torch.float64)
    return {
        "nola_delta": (x, r(3), r(3), r(3, 2, 16), r(3, 8, 2), scale),
        "svfit_delta": (x, r(8, 3), r(3), r(3, 16), scale),
        "sorsa_delta": (x, r(8, 3), r(3), r(3, 16), scale),
        "flora_conv2d_delta": (r(1, 4, 5, 5), r(2, 2, 2, 2), r(4, 2), r(2, 2), r(3, 2), r(3, 2), scale,
                               [2, 2], [1, 1], [1, 1], 2),
        "tera_delta": (x, r(8), r(2, 2, 2, 2), r(2, 2), r(4, 2), r(4, 2), r(4, 2), scale),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_op_opcheck_and_gradients(name):
    args = _op_cases()[name]
    op = getattr(torch.ops.splice, name).default
    torch.library.opcheck(op, args)
    assert torch.autograd.gradcheck(op, args)


def test_fake_impls_check_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        e, one = torch.empty, torch.tensor(1.0)
        assert tuple(torch.ops.splice.tera_delta(e(2, 3, 16), e(8), e(2, 2, 2, 2), e(2, 2), e(4, 2), e(4, 2), e(4, 2),
                                                 one).shape) == (2, 3, 8)
        with pytest.raises(Exception, match="nola_delta: input features 8 != 16"):
            torch.ops.splice.nola_delta(e(3, 8), e(3), e(3), e(3, 2, 16), e(3, 8, 2), one)
        with pytest.raises(Exception, match="svd delta: U, S, Vh disagree on the rank"):
            torch.ops.splice.svfit_delta(e(3, 16), e(8, 3), e(2), e(3, 16), one)
        with pytest.raises(Exception, match="flora_conv2d_delta: input channels 4 != 3 x 1 groups"):
            torch.ops.splice.flora_conv2d_delta(e(1, 4, 5, 5), e(2, 2, 1, 1), e(6, 2), e(3, 2), e(1, 1), e(1, 1), one,
                                                [1, 1], [0, 0], [1, 1], 1)
