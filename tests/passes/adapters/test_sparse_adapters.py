"""Sparse fine-tuning masks as adapters (LIFT, S2FT, SaRA, HFT, DSEE) and adapter.extract:
the delta ops, each method's defining property, zero init, fold/unfold, ONNX, bad input."""
import re

import pytest
import torch
from zoo_graphs import assert_one_line_error, captured, input_grid, max_diff

import splice
from splice.errors import ConfigError
from splice.passes.adapters._common import sites
from splice.passes.adapters._sparse import low_rank

OPS = torch.ops.splice
Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"
METHODS = ["adapter.lift", "adapter.s2ft", "adapter.s2ft:side=out,select=norm,group=16", "adapter.sara",
           "adapter.hft", "adapter.dsee"]


def _site(graph, path):
    return next(s for s in sites(graph) if s.path == path)


def _randomized(graph, seed=0):
    """The adapter's trainable tensors set to random non-zero values (a 'trained' adapter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in splice.adapter_parameters(graph).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return graph


def _update(before, after, path):
    """ΔW a fold wrote into ``path``'s weight."""
    return after.tensor(f"{path}.weight") - before.tensor(f"{path}.weight")


# ----------------------------------------------------------------------------- the ops


def _op_cases(gen):
    x = torch.randn(2, 5, 12, generator=gen, requires_grad=True)
    m2 = torch.rand(8, 12, generator=gen) < 0.3
    rows, cols = torch.rand(8, generator=gen) < 0.5, torch.rand(12, generator=gen) < 0.5
    dense = {  # op args -> the dense ΔW they stand for
        "sparse_delta": ((torch.randn(int(m2.sum()), generator=gen), m2), lambda v, m: torch.zeros(8, 12).masked_scatter(m, v)),
        "row_delta": ((torch.randn(int(rows.sum()), 12, generator=gen), rows),
                      lambda v, m: torch.zeros(8, 12).index_copy(0, m.nonzero().squeeze(1), v)),
        "col_delta": ((torch.randn(8, int(cols.sum()), generator=gen), cols),
                      lambda v, m: torch.zeros(8, 12).index_copy(1, m.nonzero().squeeze(1), v)),
    }
    return x, dense


@pytest.mark.parametrize("name", ["sparse_delta", "row_delta", "col_delta"])
def test_delta_ops_match_dense_reference_opcheck_and_gradients(name):
    x, cases = _op_cases(torch.Generator().manual_seed(0))
    (values, mask), to_dense = cases[name]
    values.requires_grad_(True)
    scale = torch.tensor(0.5)
    op = getattr(OPS, name).default
    y = op(x, values, mask, scale)
    ref = x @ to_dense(values, mask).T * 0.5
    torch.testing.assert_close(y, ref)
    torch.library.opcheck(op, (x, values, mask, scale))
    got = torch.autograd.grad(y.square().sum(), (x, values))
    want = torch.autograd.grad(ref.square().sum(), (x, values))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dsee_op_is_lora_plus_sparse_with_gradients():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, generator=gen, requires_grad=True)
    a, b = torch.randn(2, 12, generator=gen, requires_grad=True), torch.randn(8, 2, generator=gen, requires_grad=True)
    mask = torch.rand(8, 12, generator=gen) < 0.2
    v = torch.randn(int(mask.sum()), generator=gen, requires_grad=True)
    scale = torch.tensor(0.25)
    y = OPS.dsee_delta(x, a, b, v, mask, scale)
    ref = x @ (b @ a + torch.zeros(8, 12).masked_scatter(mask, v)).T * 0.25
    torch.testing.assert_close(y, ref)
    torch.library.opcheck(OPS.dsee_delta.default, (x, a, b, v, mask, scale))
    for got, want in zip(torch.autograd.grad(y.sum(), (x, a, b, v)), torch.autograd.grad(ref.sum(), (x, a, b, v))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fake_impls_check_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        mask = torch.empty(6, 4, dtype=torch.bool)
        assert OPS.sparse_delta(torch.empty(2, 3, 4), torch.empty(5), mask, torch.tensor(1.0)).shape == (2, 3, 6)
        assert OPS.row_delta(torch.empty(3, 4), torch.empty(2, 4), torch.empty(6, dtype=torch.bool),
                             torch.tensor(1.0)).shape == (3, 6)
        with pytest.raises(Exception, match="input features 5 != mask's 4"):
            OPS.sparse_delta(torch.empty(3, 5), torch.empty(5), mask, torch.tensor(1.0))


# ------------------------------------------------------------------- defining properties


@pytest.mark.parametrize("spec", METHODS)
def test_zero_init_exact_and_trainable_counts_equal_mask_sizes(spec):
    zm, g = captured("llama")
    out = g.apply(spec)
    for inputs in input_grid(zm, g)[:2]:
        a, b = g.run(*inputs), out.run(*inputs)
        assert all(torch.equal(a[k], b[k]) for k in a)
    params = splice.adapter_parameters(out)
    assert {n for n, p in out.gm.named_parameters() if p.requires_grad} == set(params)
    total = sum(p.numel() for p in params.values())
    assert out.history[-1]["report"]["trainable_params"] == total
    for s in sites(out):
        t = s.tensors(out)
        lowrank = t["A"].numel() + t["B"].numel() if "A" in t else 0
        selected = int(t["mask"].sum()) * (1 if t["mask"].dim() == 2 else t["values"].numel() // int(t["mask"].sum()))
        assert t["values"].numel() == selected and sum(t[k].numel() for k in s.method.trainable) == selected + lowrank


@pytest.mark.parametrize("side", ["in", "out"])
def test_s2ft_update_touches_only_the_chosen_channels(side):
    _, g = captured("llama")
    out = _randomized(g.apply(f"adapter.s2ft:side={side},fraction=0.25,targets=o_proj|down_proj"))
    folded = out.apply("adapter.fold")
    for path in ("model.layers.0.self_attn.o_proj", DOWN):
        mask = _site(out, path).tensors(out)["mask"]
        dw = _update(out, folded, path)
        axis = 1 if side == "in" else 0
        touched = dw.abs().sum(dim=1 - axis) > 0
        assert torch.equal(touched, mask) and int(mask.sum()) == round(0.25 * dw.shape[axis])


def test_s2ft_groups_pick_whole_units_by_norm():
    _, g = captured("llama")
    out = g.apply("adapter.s2ft:side=in,group=16,fraction=0.5,select=norm,targets=o_proj")
    w = g.tensor("model.layers.0.self_attn.o_proj.weight")
    mask = _site(out, "model.layers.0.self_attn.o_proj").tensors(out)["mask"]
    norms = w.reshape(64, 4, 16).norm(dim=(0, 2))  # the L2 norm of each 16-column unit
    units = mask.reshape(4, 16)
    assert torch.equal(units.all(1), units.any(1)) and torch.equal(units.all(1), norms >= norms.topk(2).values[-1])


def test_lift_mask_is_top_k_of_the_low_rank_approximation():
    _, g = captured("llama")
    out = g.apply("adapter.lift:rank=4,density=0.1")
    w = g.tensor(f"{Q}.weight").detach()
    u, s, vh = torch.linalg.svd(w)
    approx = (u[:, :4] * s[:4]) @ vh[:4]
    mask = _site(out, Q).tensors(out)["mask"]
    k = round(0.1 * w.numel())
    assert int(mask.sum()) == k
    assert float(approx.abs()[mask].min()) >= float(approx.abs()[~mask].max())
    assert not torch.equal(mask, w.abs() >= w.abs().flatten().topk(k).values[-1])  # not plain magnitude


@pytest.mark.parametrize("option", ["density=0.2", "threshold=0.02"])
def test_sara_selects_only_small_weights(option):
    _, g = captured("llama")
    out = g.apply(f"adapter.sara:{option}")
    for s in sites(out):
        w = g.tensor(f"{s.path}.weight").detach().abs()
        mask = s.tensors(out)["mask"]
        if option.startswith("threshold"):
            assert torch.equal(mask, w < 0.02)
        else:
            assert int(mask.sum()) == round(0.2 * w.numel()) and float(w[mask].max()) <= float(w[~mask].min())


def test_hft_freezes_half_of_every_layer_seeded():
    _, g = captured("llama")
    out = splice.Pipeline(["adapter.hft"]).run(g, probe=False, seed=1).graph
    again = splice.Pipeline(["adapter.hft"]).run(g, probe=False, seed=1).graph
    other = splice.Pipeline(["adapter.hft"]).run(g, probe=False, seed=2).graph
    for s in sites(out):
        w = g.tensor(f"{s.path}.weight")
        t = s.tensors(out)
        assert int(t["mask"].sum()) == w.shape[0] // 2 and t["values"].numel() * 2 == w.numel()
        assert torch.equal(t["mask"], _site(again, s.path).tensors(again)["mask"])
    assert any(not torch.equal(s.tensors(out)["mask"], _site(other, s.path).tensors(other)["mask"]) for s in sites(out))
    report = out.history[-1]["report"]
    assert report["trainable_params"] * 2 == sum(g.tensor(f"{s.path}.weight").numel() for s in sites(out))


def test_dsee_is_low_rank_plus_sparse_on_the_largest_residuals():
    _, g = captured("llama")
    out = _randomized(g.apply("adapter.dsee:rank=4,density=0.05,targets=q_proj"))
    t = _site(out, Q).tensors(out)
    w = g.tensor(f"{Q}.weight").detach()
    residual = (w - low_rank(w, 4)).abs()
    assert float(residual[t["mask"]].min()) >= float(residual[~t["mask"]].max())
    expect = t["B"] @ t["A"] + torch.zeros(64, 64).masked_scatter(t["mask"], t["values"])
    torch.testing.assert_close(_update(out, out.apply("adapter.fold"), Q), expect.detach(), atol=1e-6, rtol=0)


# -------------------------------------------------------------- fold / unfold / export


@pytest.mark.parametrize("spec", [pytest.param(m, marks=() if m == "adapter.s2ft" else pytest.mark.slow)
                                  for m in METHODS])  # the fast suite: one; the registry matrix exports every one
def test_fold_unfold_and_onnx_parity(spec, tmp_path):
    zm, g = captured("llama")
    out = _randomized(g.apply(spec))
    grid = input_grid(zm, g)
    assert max_diff(out, g, grid[0]) > 1e-3  # the update is live
    folded = out.apply("adapter.fold")
    assert max_diff(out, folded, grid[1]) <= 1e-5
    back = folded.apply("adapter.unfold")
    assert max(float((back.tensor(k) - t).detach().abs().max()) for k, t in out.tensors().items()
               if t.is_floating_point()) <= 1e-6
    for graph, name in ((out, "unfolded"), (folded, "folded")):
        path = splice.export_onnx(graph, tmp_path / f"{name}.onnx")
        assert splice.parity(graph, path, grid) <= 1e-4


def test_sparse_adapter_on_a_quantized_base():
    zm, g = captured("llama")
    q = g.apply("quantize.rtn:bits=8,group_size=32")
    out = _randomized(q.apply("adapter.lift:targets=q_proj|v_proj"))
    assert max_diff(out, q, g.example_inputs) > 1e-4
    assert splice.adapter_parameters(out)
    report = out.apply("adapter.fold").history[-1]["report"]
    assert all(v["requant_sqnr_db"] > 30 for v in report["layers"].values())


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("spec, needle", [
    ("adapter.lift:density=0", "adapter.lift: density must be in (0, 1]"),
    ("adapter.lift:rank=65,targets=q_proj", f"rank 65 exceeds min(in, out) = 64 of layer '{Q}'"),
    ("adapter.dsee:rank=0", "adapter.dsee: rank must be >= 1"),
    ("adapter.s2ft:fraction=1.5", "adapter.s2ft: fraction must be in (0, 1]"),
    ("adapter.s2ft:group=48,targets=q_proj", f"group 48 does not divide the 64 input channels of layer '{Q}'"),
    ("adapter.sara:threshold=1e-9,targets=q_proj", f"no weight of layer '{Q}' is below threshold 1e-09"),
    ("adapter.hft:targets=nothing_here", "targets 'nothing_here' matched no linear layer"),
])
def test_bad_options(spec, needle):
    assert_one_line_error([spec], re.escape(needle))


def test_same_name_twice_on_a_layer_is_an_error():
    _, g = captured("llama")
    with pytest.raises(ConfigError, match="already has an adapter named 'default'"):
        g.apply("adapter.lora:targets=q_proj", "adapter.sara:targets=q_proj")


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("spec", ["adapter.lift:density=0.1", "adapter.s2ft:fraction=0.25"])
def test_training_changes_only_the_selected_entries(spec):
    from splice.eval.data import ByteTokenizer, builtin_text

    _, g = captured("llama")
    start = g.apply(spec)
    trained, report = splice.train(start, [builtin_text("gpl3")[:4000]], steps=3, lr=1e-2, seq_len=32, batch_size=2,
                                   tokenizer=ByteTokenizer(), progress=False)
    assert all(torch.equal(trained.tensor(k), t) for k, t in start.tensors().items()
               if k not in splice.adapter_parameters(start))  # base and masks untouched
    folded = trained.apply("adapter.fold")
    for s in sites(trained):
        t = s.tensors(trained)
        selected = t["mask"] if t["mask"].dim() == 2 else t["mask"][None, :].expand(t["values"].shape[0], -1)
        changed = _update(trained, folded, s.path) != 0
        assert not changed[~selected].any() and changed.sum() > 0.9 * selected.sum()
