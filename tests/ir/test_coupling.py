"""Coupling analysis (ir/coupling.py) and physical shrinking (ir/shrink.py) on every zoo model.

Structure: which groups each model has. Numerics: shrinking a group gives the original graph's
outputs with the removed units' outgoing contributions zeroed (the columns of the layers that
read them), at two batch sizes and sequence lengths; the residual stream is checked against the
eager model with its parameters sliced. Sizes: the parameter count drops by exactly what the
removed units own. Export: the shrunk graph verifies, re-exports and runs in ONNX Runtime.
"""
import copy
import functools

import pytest
import torch

import splice
from splice.errors import ConfigError
from splice.ir.coupling import analyze
from splice.ir.graph import set_attr
from splice.ir.shrink import shrink
from splice.ir.verify import verify
from zoo_graphs import captured, input_grid

ZOO = ["llama", "qwen2", "gpt2", "bert", "vit", "cnn"]


@functools.lru_cache(maxsize=None)
def coupling(name):
    return analyze(captured(name)[1])


def kinds(c, kind):
    return [g for g in c.groups if g.kind == kind]


# --------------------------------------------------------------------------- structure


def test_llama_groups():
    c = coupling("llama")
    mlp, kv, heads = kinds(c, "mlp"), kinds(c, "kv_heads"), kinds(c, "heads")
    assert [(g.units, g.unit) for g in mlp] == [(128, 1)] * 2
    assert [(g.units, g.unit) for g in kv] == [(2, 16)] * 2
    assert [(g.units, g.unit, g.per_parent) for g in heads] == [(4, 16, 2)] * 2
    assert [g.parent for g in heads] == [g.id for g in kv]
    for g in mlp:
        assert {m.target.split(".")[-2] for m in g.members} == {"gate_proj", "up_proj", "down_proj"}
        assert g.shrinkable
    k0 = kv[0]
    q = next(m for m in k0.members if m.target.endswith("q_proj.weight"))
    k = next(m for m in k0.members if m.target.endswith("k_proj.weight"))
    assert q.index.shape == (2, 32) and torch.equal(q.index[1], torch.arange(32, 64))  # its 2 query heads
    assert k.index.shape == (2, 16) and torch.equal(k.index[1], torch.arange(16, 32))
    residual, = kinds(c, "residual")
    assert residual.shrinkable and residual.units == 64
    assert "lm_head.weight" in {m.target for m in residual.members}  # tied with the embedding
    emb, = kinds(c, "embedding")
    assert "embedding" in str(emb.pinned_by)


def test_rope_pins_query_key_head_dim():
    c = coupling("llama")
    rope = [g for g in c.groups if any(m.target.endswith("inv_freq") for m in g.members)]
    assert rope and all("slices part of the axis" in str(g.pinned_by) for g in rope)
    assert "aten.slice.Tensor" in str(rope[0].pinned_by)


def test_gpt2_fused_qkv():
    c = coupling("gpt2")
    heads = kinds(c, "heads")
    assert [(g.units, g.unit) for g in heads] == [(4, 16)] * 2
    qkv = next(m for m in heads[0].members if m.target.endswith("c_attn.weight"))
    # head 1 owns rows 16..31 of q, 80..95 of k and 144..159 of v in the fused weight
    assert qkv.index[1].tolist() == [*range(16, 32), *range(80, 96), *range(144, 160)]
    assert all(g.shrinkable for g in heads + kinds(c, "mlp"))
    # a head_dim class covers part of the fused axis: its units own only those rows (V's dim 1 in each head)
    v_dim = next(m for g in kinds(c, "head_dim") for m in g.members
                 if m.target == "transformer.h.0.attn.c_attn.weight" and m.index.shape == (16, 4))
    assert v_dim.index[1].tolist() == [129, 145, 161, 177]


def test_bert_residual_pinned_by_output():
    residual, = kinds(coupling("bert"), "residual")
    assert "graph output 'last_hidden_state'" in str(residual.pinned_by)


def test_cnn_depthwise_and_residual_couple():
    c = coupling("cnn")
    first, second = kinds(c, "residual")
    targets = {(m.target, m.axis) for m in first.members}
    # stem, both depthwise convs, block 0's pointwise conv on both axes (its residual add), the shortcut's input
    assert {("stem.0.weight", 0), ("blocks.0.dw.weight", 0), ("blocks.1.dw.weight", 0),
            ("blocks.0.pw.weight", 0), ("blocks.0.pw.weight", 1), ("blocks.1.short.0.weight", 1),
            ("blocks.0.bn1.running_var", 0)} <= targets
    assert {("blocks.1.pw.weight", 0), ("blocks.1.short.0.weight", 0), ("fc.weight", 1)} <= \
        {(m.target, m.axis) for m in second.members}
    assert first.shrinkable and second.shrinkable
    assert "graph input 'pixel_values'" in str(next(g for g in c.groups if g.units == 3).pinned_by)


@pytest.mark.parametrize("name", ZOO)
def test_analysis_is_deterministic(name):
    a, b = coupling(name), analyze(captured(name)[1])
    assert a.describe() == b.describe()
    assert all(torch.equal(x.index, y.index) for g, h in zip(a.groups, b.groups) for x, y in zip(g.members, h.members))


# --------------------------------------------------------------------------- numerics


def zero_outgoing(graph, group, removed):
    """A copy of ``graph`` with the removed units' columns zeroed in every layer reading them."""
    out = graph.copy()
    for m in group.members:
        t = graph.tensor(m.target)
        if t.dim() >= 2 and m.axis == 1:
            set_attr(out.gm, m.target, t.detach().clone().index_fill_(1, m.index[removed].flatten(), 0.0))
    return out


def expected_drop(graph, group, n_removed):
    """Parameters the removed units own: each member tensor loses their positions on its axis
    (a tensor on two axes, like a pointwise conv inside a residual block, loses both)."""
    shapes = {m.target: list(graph.tensor(m.target).shape) for m in group.members}
    for m in group.members:
        shapes[m.target][m.axis] -= n_removed * m.index.shape[1]
    return sum(graph.tensor(t).numel() - torch.Size(s).numel() for t, s in shapes.items())


def max_error(zm, a, b):
    return max(float((x - y).abs().max()) for inputs in input_grid(zm, a)
               for x, y in zip(a.run(*inputs).values(), b.run(*inputs).values()))


SHRINKABLE = {"llama": ("mlp", "heads", "kv_heads"), "qwen2": ("mlp", "heads", "kv_heads"),
              "gpt2": ("mlp", "heads"), "bert": ("mlp", "heads"), "vit": ("mlp", "heads"), "cnn": ("residual",)}


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, ks in SHRINKABLE.items() for k in ks])
def test_shrink_equals_zeroed_contributions(name, kind):
    """The last group of ``kind`` (every group of the CNN) loses every third unit."""
    zm, graph = captured(name)
    c = coupling(name)
    groups = [g for g in kinds(c, kind) if g.shrinkable]
    assert groups
    for group in groups if name == "cnn" else groups[-1:]:
        check_removal(zm, graph, c, group)


def check_removal(zm, graph, c, group):
    removed = torch.arange(0, group.units, 3)
    keep = torch.tensor([u for u in range(group.units) if u not in set(removed.tolist())])
    if group.parent is not None:  # query heads: one per KV head, a different one in each
        keep, removed = torch.tensor([0, 3]), torch.tensor([1, 2])
    before = graph.num_params()
    small = shrink(graph, {group.id: keep}, c)
    verify(small)
    assert max_error(zm, small, zero_outgoing(graph, group, removed)) <= 1e-5
    assert graph.num_params() - small.num_params() == expected_drop(graph, group, len(removed))
    assert graph.num_params() == before  # the input graph is untouched


def sliced_module(zm, group, keep):
    """The eager model with every member of ``group`` sliced to ``keep`` (tied tensors once)."""
    model = copy.deepcopy(zm.model)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    new = {}
    for m in group.members:
        t = new.get(id(params[m.target]), params[m.target])
        new[id(params[m.target])] = t.detach().index_select(m.axis, m.index[keep].flatten())
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in store.items():
                if v is not None and id(v) in new:
                    store[k] = torch.nn.Parameter(new[id(v)], requires_grad=False) if store is mod._parameters \
                        else new[id(v)]
    return model


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_shrink_residual_matches_sliced_eager_model(name):
    """RMSNorm's mean runs over the kept channels, as in the eager model with sliced weights (the
    eager LayerNorm and GPT-2 modules keep their configured widths, so they cannot be the reference)."""
    zm, graph = captured(name)
    residual, = kinds(coupling(name), "residual")
    keep = torch.arange(1, residual.units, 2)
    small = shrink(graph, {residual.id: keep}, coupling(name))
    verify(small)
    model = sliced_module(zm, residual, keep)
    for inputs in input_grid(zm, graph):
        expected = model(**dict(zip(graph.input_names, inputs)))
        got = small.run(*inputs)
        key = "logits"
        assert float((got[key] - expected[key]).abs().max()) <= 1e-5


def test_gqa_whole_kv_groups_and_heads_together():
    zm, graph = captured("llama")
    c = coupling("llama")
    kv, heads = kinds(c, "kv_heads")[0], kinds(c, "heads")[0]
    small = shrink(graph, {kv.id: [1], heads.id: [2]}, c)  # KV head 1 with one of its two query heads
    verify(small)
    shapes = {k.split(".")[-2]: tuple(v.shape) for k, v in small.tensors().items() if "layers.0.self_attn" in k}
    assert shapes == {"q_proj": (16, 64), "k_proj": (16, 64), "v_proj": (16, 64), "o_proj": (64, 16)}
    reference = zero_outgoing(graph, heads, torch.tensor([0, 1, 3]))
    assert max_error(zm, small, reference) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit", "cnn"])
def test_shrunk_graph_exports_to_onnx(name, tmp_path):
    zm, graph = captured(name)
    c = coupling(name)
    keep = {g.id: torch.arange(0, g.units, 2) for g in c.groups
            if g.shrinkable and g.kind in ("mlp", "kv_heads", "residual", "heads") and g.parent is None}
    small = shrink(graph, keep, c)
    verify(small)
    small.export_program()
    path = splice.export_onnx(small, tmp_path / "m.onnx")
    assert splice.parity(small, path, input_grid(zm, graph)) <= 1e-4


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("make_keep", "message"), [
    (lambda c: {kinds(c, "embedding")[0].id: [0]}, r"pinned by rows read by an embedding lookup \(embedding"),
    (lambda c: {kinds(c, "mlp")[0].id: []}, "would lose all 128 units"),
    (lambda c: {kinds(c, "mlp")[0].id: [0, 128]}, r"has units 0\.\.127, got 128"),
    (lambda c: {kinds(c, "heads")[0].id: [0, 1, 2]}, "same number of query heads in every kept KV head"),
    (lambda c: {999: [0]}, "no coupling group #999"),
])
def test_bad_keep_is_one_line(make_keep, message):
    c = coupling("llama")
    with pytest.raises(ConfigError, match=message) as err:
        shrink(captured("llama")[1], make_keep(c), c)
    assert "\n" not in str(err.value)


class SqueezeExcite(torch.nn.Module):
    """Conv, squeeze-excitation (pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid -> scale), grouped conv, head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.reduce = torch.nn.Conv2d(16, 4, 1)
        self.expand = torch.nn.Conv2d(4, 16, 1)
        self.grouped = torch.nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        s = torch.nn.functional.adaptive_avg_pool2d(y, 1)
        y = y * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))
        return self.head(torch.relu(self.grouped(y)).mean((2, 3)))


def test_squeeze_excitation_and_grouped_conv():
    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    graph = splice.capture(model, (torch.randn(2, 3, 8, 8),))
    c = analyze(graph)

    def groups_of(target, axis):
        return [g for g in c.groups if any((m.target, m.axis) == (target, axis) for m in g.members)]

    # the grouped conv reads the conv's 16 channels as 4 conv groups × 4 channels: those are the
    # groups (a conv group shrinks whole, or each group loses the same channels); the SE branch's
    # output scales the same channels, so its expand conv's rows belong to both
    conv_groups, = [g for g in groups_of("conv.weight", 0) if g in groups_of("grouped.weight", 0)]
    per_group, = groups_of("grouped.weight", 1)
    assert groups_of("conv.weight", 0) == groups_of("expand.weight", 0) == [conv_groups, per_group]
    assert conv_groups.members[0].index[1].tolist() == [4, 5, 6, 7]  # conv group 1: channels 4..7
    squeeze, = groups_of("reduce.weight", 0)
    assert groups_of("expand.weight", 1) == [squeeze] and squeeze.shrinkable
    x = [(torch.randn(b, 3, 8, 8),) for b in (1, 3)]
    for group, keep in ((squeeze, [0, 2]), (conv_groups, [1, 3]), (per_group, [0, 1, 3])):
        small = shrink(graph, {group.id: torch.tensor(keep)}, c)
        verify(small)
        removed = torch.tensor([u for u in range(group.units) if u not in keep])
        reference = zero_outgoing(graph, group, removed)
        assert max(float((small.run(*i)["output"] - reference.run(*i)["output"]).abs().max()) for i in x) <= 1e-5
