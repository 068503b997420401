"""Structured pruning (``prune.channels``, ``prune.heads``): the lowest-norm units of each coupling
group removed physically — parameter counts down by exactly what the removed units own, head
counts fixed under GQA, masks of an earlier unstructured pruning sliced along — and the result
exports and matches ONNX Runtime; one-line errors for what cannot shrink."""
import copy

import pytest
import torch
from zoo_graphs import assert_bad_option, assert_one_line_error, captured, input_grid

import splice
from splice.ir.coupling import analyze
from splice.ir.shrink import shrink
from splice.ir.sparsity import check_masks, weight_layers
from splice.ir.weights import dense_weight
from splice.passes.prune._structured import unit_scores


def _by_kind(graph, kind):
    return [g for g in analyze(graph).groups if g.kind == kind]


def test_channels_remove_the_lowest_norm_mlp_channels():
    zm, g = captured("llama")
    out = g.apply("prune.channels:amount=0.25")
    expected = {}
    for group in _by_kind(g, "mlp"):
        scores = unit_scores(g, group, "l2")
        expected[group.id] = torch.topk(scores, 96).indices.sort().values
    ref = shrink(g, expected)
    assert g.num_params() - out.num_params() == 2 * 32 * 3 * 64  # 2 layers × 32 channels × gate/up/down
    for inputs in input_grid(zm, g)[:2]:
        assert torch.equal(out.run(*inputs)["logits"], ref.run(*inputs)["logits"])
    assert dense_weight(out, weight_layers(out)["model.layers.0.mlp.down_proj"]).shape == (64, 96)


def test_structured_wanda_scores_the_readers_of_each_channel():
    """score=wanda keeps the MLP channels with the largest Σ|W_down[:, j]|·‖X_j‖ (X: down_proj's inputs)."""
    from zoo_graphs import calibration

    zm, g = captured("llama")
    cal = calibration(zm, g, n=4, seq=32)
    out = g.apply("prune.channels:score=wanda,amount=0.25,targets=model.layers.0.mlp.*", calibration=cal)
    x = []
    hook = zm.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: x.append(i[0].reshape(-1, 128)))
    with torch.no_grad():
        for sample in cal:
            zm.model(**dict(zip(g.input_names, sample)), use_cache=False)
    hook.remove()
    norm = torch.cat(x).double().pow(2).sum(0).sqrt()
    w = zm.model.model.layers[0].mlp.down_proj.weight.detach().double()
    kept = torch.topk((w.abs() * norm).sum(0), 96).indices.sort().values
    assert torch.equal(dense_weight(out, weight_layers(out)["model.layers.0.mlp.down_proj"]), w[:, kept].float())


@pytest.mark.parametrize("model", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_heads_under_gqa(model, tmp_path):
    """mode=kv removes a KV head with both its query heads; mode=query one query head of each KV group."""
    zm, g = captured(model)
    kv = g.apply("prune.heads:amount=0.5")
    q = g.apply("prune.heads:mode=query,amount=0.5")
    layers = weight_layers(kv)
    assert tuple(dense_weight(kv, layers["model.layers.0.self_attn.q_proj"]).shape) == (32, 64)  # 2 of 4 query heads
    assert tuple(dense_weight(kv, layers["model.layers.0.self_attn.k_proj"]).shape) == (16, 64)  # 1 of 2 KV heads
    layers = weight_layers(q)
    assert tuple(dense_weight(q, layers["model.layers.0.self_attn.q_proj"]).shape) == (32, 64)
    assert tuple(dense_weight(q, layers["model.layers.0.self_attn.k_proj"]).shape) == (32, 64)  # both KV heads kept
    for graph, name in ((kv, "kv"), (q, "q")):
        onnx = splice.export_onnx(graph, tmp_path / f"{name}.onnx")
        assert splice.parity(graph, onnx, input_grid(zm, g)) <= 1e-4


@pytest.mark.parametrize("model", ["gpt2", "vit"])
def test_heads_and_channels_without_gqa(model, tmp_path):
    zm, g = captured(model)
    out = g.apply("prune.heads:amount=0.5", "prune.channels:amount=0.25")
    assert out.num_params() < g.num_params()
    onnx = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, onnx, input_grid(zm, g)) <= 1e-4


def test_masks_are_sliced_with_their_weights():
    _, g = captured("llama")
    out = g.apply("prune.magnitude", "prune.channels:amount=0.25")
    layers = weight_layers(out)
    for key, keep in out.masks.items():
        assert keep.shape == dense_weight(out, layers[key]).shape
    assert check_masks(out) == []


class MobileBlock(torch.nn.Module):
    """Stem, then depthwise conv + BN + ReLU, squeeze-excitation, pointwise conv + BN, residual add; pool; head."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        self.dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.reduce, self.expand = torch.nn.Conv2d(c, 4, 1), torch.nn.Conv2d(4, c, 1)
        self.pw = torch.nn.Conv2d(c, c, 1)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.head = torch.nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.dw(x)))
        y = y * torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.head(torch.relu(self.bn2(self.pw(y)) + x).mean((2, 3)))


def test_cnn_with_depthwise_se_and_residual(tmp_path):
    torch.manual_seed(0)
    model = MobileBlock().eval()
    for bn in (model.stem[1], model.bn1, model.bn2):
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    graph = splice.capture(model, (x,))
    out = graph.apply("prune.channels:amount=0.25")
    assert out.history[-1]["report"]["units_removed"] >= 4 + 1  # 4 of 16 channels, 1 of 4 SE channels
    assert out.num_params() < graph.num_params()
    onnx = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, onnx, [(torch.randn(b, 3, 8, 8),) for b in (1, 3)]) <= 1e-4


def test_zoo_cnn_from_python(tmp_path):
    zm, g = captured("cnn")
    out = g.apply("prune.channels:amount=0.25")
    assert out.num_params() < 0.8 * g.num_params()
    onnx = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, onnx, input_grid(zm, g)) <= 1e-4


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("spec, message", [
    ("prune.channels:amount=1", r"prune.channels: amount must be in \[0, 1\), got 1.0"),
    ("prune.heads:mode=value", "prune.heads: mode must be one of kv, query"),
    ("prune.channels:kinds=mlp,heads", "prune.channels: kinds must be auto or a comma list"),
])
def test_bad_options(spec, message):
    assert_bad_option(spec, message)


def test_removing_every_unit_is_refused():
    assert_one_line_error(["prune.heads:amount=0.9"], r"prune.heads: amount=0.9 would remove every unit \(2\) of "
                                                      r"kv_heads group")


def test_a_pinned_target_names_the_op():
    assert_one_line_error(["prune.channels:kinds=channels,targets=classifier"],
                          r"prune.channels: channels group #\d+ of classifier cannot shrink: pinned by graph output "
                          r"'logits'", model="vit")


def test_query_mode_needs_gqa():
    assert_one_line_error(["prune.heads:mode=query"], "prune.heads: mode=query needs grouped-query attention",
                          model="gpt2")


# ------------------------------------------------------------------------------------- depth


def test_depth_skips_the_block_exactly():
    """Removing a block gives the model with that layer deleted (transformers, eager), to 1e-5."""
    import copy

    zm, g = captured("llama")
    out = g.apply("prune.depth:score=random,protect_first=0,seed=1")
    removed = out.history[-1]["report"]["removed"]
    index = int(removed[0].rsplit(".", 1)[1])
    model = copy.deepcopy(zm.model)
    model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(model.model.layers) if i != index])
    for layer_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = layer_idx
    for b, s in ((1, 5), (3, 17)):
        kw = zm.make_inputs(b, s)
        with torch.no_grad():
            ref = model(**kw, use_cache=False).logits
        assert torch.allclose(out.run(*(kw[n] for n in g.input_names))["logits"], ref, atol=1e-5)
    assert out.num_params() < g.num_params()


@pytest.mark.parametrize("score", ["bi", "angular"])
def test_depth_removes_the_block_its_score_ranks_last(score):
    from zoo_graphs import calibration

    zm, g = captured("gpt2")
    out = g.apply(f"prune.depth:score={score},protect_first=0", calibration=calibration(zm, g))
    rep = out.history[-1]["report"]
    best = min(range(len(rep["scores"])), key=rep["scores"].__getitem__)
    assert rep["removed"] == [f"transformer.h.{best}"]


def test_depth_drops_the_masks_of_removed_blocks():
    _, g = captured("llama")
    out = g.apply("prune.magnitude", "prune.depth:score=random")
    assert not any(k.startswith("model.layers.1.") for k in out.masks) and check_masks(out) == []
    assert any(k.startswith("model.layers.0.") for k in out.masks)


def test_depth_bad_input():
    assert_bad_option("prune.depth:blocks=0", "prune.depth: blocks must be >= 1, got 0")
    assert_bad_option("prune.depth:score=cosine", "prune.depth: score must be one of bi, angular, random")
    assert_one_line_error(["prune.depth:blocks=2,score=random"], r"prune.depth: blocks=2 but only 1 of the 2 blocks "
                                                                 r"may go \(protect_first=1;")


def test_taylor_scores_are_weight_times_gradient():
    """score=taylor keeps the MLP channels with the largest Σ |W ⊙ ∂L/∂W| over gate/up rows and down columns
    (L: next-token cross-entropy on the calibration tokens, summed over samples)."""
    from zoo_graphs import calibration

    zm, g = captured("llama")
    cal = calibration(zm, g, n=2, seq=40)
    out = g.apply("prune.channels:score=taylor,amount=0.25,targets=model.layers.1.mlp.*", calibration=cal)
    model = copy.deepcopy(zm.model).requires_grad_(True)  # the zoo model's tensors are the graph's: left frozen
    for sample in cal:
        kw = dict(zip(g.input_names, sample))
        logits = model(**kw, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), kw["input_ids"][:, 1:].flatten()).backward()
    mlp = model.model.layers[1].mlp
    imp = lambda lin, axis: (lin.weight * lin.weight.grad).abs().sum(axis).double()  # noqa: E731
    scores = imp(mlp.gate_proj, 1) + imp(mlp.up_proj, 1) + imp(mlp.down_proj, 0)
    kept = torch.topk(scores, 96).indices.sort().values
    got = dense_weight(out, weight_layers(out)["model.layers.1.mlp.down_proj"])
    assert torch.equal(got, mlp.down_proj.weight.detach()[:, kept])


def test_taylor_on_a_classifier_uses_its_own_predictions(tmp_path):
    zm, g = captured("cnn")
    out = g.apply("prune.channels:score=taylor,amount=0.25", calibration=[tuple(x) for x in input_grid(zm, g)])
    assert out.num_params() < g.num_params()
    onnx = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, onnx, input_grid(zm, g)) <= 1e-4


def test_taylor_needs_a_label_free_loss():
    zm, g = captured("bert")
    if "logits" in g.output_names:
        pytest.skip("the zoo BERT has a head")
    with pytest.raises(splice.errors.ConfigError, match="^prune.channels: needs a loss without labels"):
        g.apply("prune.channels:score=taylor", calibration=[tuple(zm.make_inputs(2, 64)[k] for k in g.input_names)])
