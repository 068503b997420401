"""Unstructured and N:M pruning (``prune.magnitude``, ``prune.wanda``, ``prune.sparsegpt``,
``prune.nm``): the sparsity asked for, exactly; the data-aware pruners closer to the dense model
than magnitude; masks that no later pass revives (LoRA fold, GPTQ, AWQ, save/load, ONNX) and a
verifier that names the pass that would; packed storage; one-line errors."""
import json

import pytest
import torch
from zoo_graphs import assert_bad_option, assert_one_line_error, calibration, captured, input_grid, mean_kl

import splice
from splice.errors import VerifyError
from splice.ir.sparsity import check_masks, weight_layers
from splice.ir.weights import dense_weight
from splice.passes.prune._common import output_layers


@pytest.fixture(scope="module")
def llama():
    zm, g = captured("llama")
    return zm, g, calibration(zm, g, n=8, seq=32)


def _masked(graph):
    """(key, node, keep) of every masked layer."""
    layers = weight_layers(graph)
    return [(k, layers[k], keep) for k, keep in graph.masks.items()]


def _zero_where_pruned(graph) -> bool:
    return all(bool((dense_weight(graph, node)[~keep] == 0).all()) for _, node, keep in _masked(graph))


@pytest.mark.parametrize("spec", ["prune.magnitude", "prune.magnitude:scope=row", "prune.magnitude:scope=global",
                                  "prune.wanda", "prune.sparsegpt"])
def test_sparsity_is_what_was_asked(llama, spec):
    _, g, cal = llama
    out = g.apply(spec + ("," if ":" in spec else ":") + "sparsity=0.5", calibration=cal)
    heads = {n.name for n in output_layers(out)}
    masked = _masked(out)
    assert len(masked) == 14 and not any(node.name in heads for _, node, _ in masked)  # 2 blocks × 7; no LM head
    assert _zero_where_pruned(out) and check_masks(out) == []
    total = sum(keep.numel() for *_, keep in masked)
    pruned = sum(int((~keep).sum()) for *_, keep in masked)
    assert pruned == pytest.approx(0.5 * total, abs=len(masked))
    if spec in ("prune.magnitude", "prune.magnitude:scope=row", "prune.wanda"):  # per layer / per row: exact
        for *_, keep in masked:
            assert int((~keep).sum()) == keep.numel() // 2
    if spec in ("prune.magnitude:scope=row", "prune.wanda"):
        for *_, keep in masked:
            assert bool(((~keep).sum(1) == keep.shape[1] // 2).all())
    assert out.history[-1]["report"]["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_is_exact(llama, criterion):
    _, g, cal = llama
    out = g.apply(f"prune.nm:n=2,m=4,criterion={criterion}", calibration=cal)
    for _, node, keep in _masked(out):
        assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all())
        w = dense_weight(out, node)
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
    assert out.history[-1]["report"]["pattern"] == "2:4"


def test_data_aware_pruners_beat_magnitude(llama):
    """On inputs like the calibration (not the same), Wanda and SparseGPT stay closer to the dense
    model than magnitude pruning at the same sparsity (their order: bench/prune.py on a real model)."""
    zm, g, cal = llama
    held = calibration(zm, g, n=4, seq=32, seed=100)
    kl = {name: mean_kl(g, g.apply(f"prune.{name}:sparsity=0.6", calibration=cal), held)
          for name in ("magnitude", "wanda", "sparsegpt")}
    assert max(kl["sparsegpt"], kl["wanda"]) < kl["magnitude"], kl


def test_sparsegpt_joint_quantization(llama, tmp_path):
    """bits=3: one sweep prunes and rounds (SparseGPT --wbits): packed 3-bit layers, pruned codes on the
    grid's zero, held-out KL below pruning-then-RTN's, and it exports with ORT parity."""
    zm, g, cal = llama
    joint = g.apply("prune.sparsegpt:sparsity=0.5,bits=3,group_size=32", calibration=cal)
    ops = [n.target for n in joint.gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.splice.qlinear.default) == len(joint.masks) == 14
    assert not check_masks(joint) and joint.history[-1]["report"]["bits"] == 3
    for _, node, keep in _masked(joint):
        assert abs(1 - float(keep.float().mean()) - 0.5) < 0.01
    held = calibration(zm, g, n=4, seq=32, seed=100)
    rtn = g.apply("prune.sparsegpt:sparsity=0.5", "quantize.rtn:bits=3,group_size=32", calibration=cal)
    assert mean_kl(g, joint, held) < mean_kl(g, rtn, held)
    onnx = splice.export_onnx(joint, tmp_path / "joint.onnx")
    assert splice.parity(joint, onnx, input_grid(zm, g)) <= 1e-4


def test_pruned_weights_stay_pruned_by_a_later_pruner(llama):
    _, g, cal = llama
    first = g.apply("prune.magnitude:sparsity=0.3")
    second = first.apply("prune.sparsegpt:sparsity=0.5", calibration=cal)
    for key, keep in first.masks.items():
        assert bool((second.masks[key] <= keep).all())  # pruned before: still pruned
    assert _zero_where_pruned(second)


def test_head_only_with_include_head(llama):
    _, g, _ = llama
    out = g.apply("prune.magnitude:include_head=true")
    assert "lm_head" in out.masks
    assert "model.embed_tokens" not in out.masks  # the tied embedding keeps its own (dense) tensor
    assert bool((dense_weight(out, weight_layers(out)["model.embed_tokens"]) != 0).all())


def test_masks_survive_lora_fold_gptq_save_and_onnx(llama, tmp_path):
    """prune -> LoRA (non-zero) -> fold -> GPTQ -> save/load -> ONNX: every pruned weight stays zero."""
    zm, g, cal = llama
    pruned = g.apply("prune.wanda", calibration=cal)
    folded = pruned.apply("adapter.lora:rank=4,init=random", "adapter.fold")
    assert check_masks(folded) == [] and _zero_where_pruned(folded)
    quant = folded.apply("quantize.gptq:bits=4,group_size=32", calibration=cal)
    assert check_masks(quant) == [] and _zero_where_pruned(quant)
    quant.save(tmp_path / "art")
    back = splice.load(tmp_path / "art")
    assert sorted(back.masks) == sorted(quant.masks)
    assert all(torch.equal(back.masks[k], quant.masks[k]) for k in quant.masks)
    assert _zero_where_pruned(back)
    onnx = splice.export_onnx(back, tmp_path / "m.onnx")
    assert splice.parity(back, onnx, input_grid(zm, g)) <= 1e-4


def test_gptq_keeps_the_mask_inside_its_updates(llama):
    """GPTQ on a pruned model spreads the pruned weights' error like SparseGPT's joint mode:
    closer to the pruned float model than rounding the pruned weights to nearest."""
    zm, g, cal = llama
    pruned = g.apply("prune.sparsegpt", calibration=cal)
    held = calibration(zm, g, n=4, seq=32, seed=100)
    gptq = pruned.apply("quantize.gptq:bits=3,group_size=32,holdout=0", calibration=cal)
    rtn = pruned.apply("quantize.rtn:bits=3,group_size=32")
    assert _zero_where_pruned(gptq) and _zero_where_pruned(rtn)
    assert mean_kl(pruned, gptq, held) < mean_kl(pruned, rtn, held)


def test_a_pass_that_revives_pruned_weights_is_named(llama):
    _, g, _ = llama
    with pytest.raises(VerifyError, match=r"quantize.rotate: revives pruned weights \(after prune.magnitude\)"
                                          r".*'model.layers.0.self_attn.q_proj'") as err:
        splice.Pipeline(["prune.magnitude", "quantize.rotate"]).run(g, probe=False)
    assert "\n" not in str(err.value)


def test_packed_artifact(llama, tmp_path):
    """A 2:4 model's masked weights are stored as values + bitmask: at most 0.6 of their dense bytes."""
    zm, g, _ = llama
    out = g.apply("prune.nm")
    out.save(tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    dense = sum(keep.numel() * 4 for keep in out.masks.values())
    other = g.bytes_by_role()["weight"] - dense
    packed = manifest["bytes_by_role"]["weight"] - other + manifest["bytes_by_role"]["mask"]
    assert packed <= 0.6 * dense, (packed, dense)
    assert out.history[-1]["report"]["weight_bytes_after"] == packed
    back = splice.load(tmp_path / "art")
    for inputs in input_grid(zm, g)[:2]:
        assert torch.equal(out.run(*inputs)["logits"], back.run(*inputs)["logits"])


def test_cnn_convs(tmp_path):
    zm, g = captured("cnn")
    out = g.apply("prune.magnitude:sparsity=0.5")
    assert any("dw" in k for k in out.masks) and "fc" not in out.masks and _zero_where_pruned(out)
    onnx = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, onnx, input_grid(zm, g)) <= 1e-4


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("spec, message", [
    ("prune.magnitude:sparsity=1", r"prune.magnitude: sparsity must be in \[0, 1\), got 1.0"),
    ("prune.wanda:sparsity=-0.1", r"prune.wanda: sparsity must be in \[0, 1\), got -0.1"),
    ("prune.nm:n=4,m=4", "prune.nm: n must be in 1..m-1"),
    ("prune.nm:criterion=taylor", "prune.nm: criterion must be one of magnitude, wanda, sparsegpt"),
    ("prune.magnitude:scope=block", "prune.magnitude: scope must be one of layer, row, global"),
    ("prune.sparsegpt:block_size=0", "prune.sparsegpt: block_size must be >= 1, got 0"),
    ("prune.sparsegpt:damp=1.5", r"prune.sparsegpt: damp must be in \(0, 1\), got 1.5"),
    ("prune.sparsegpt:bits=9", "prune.sparsegpt: bits must be 2..8, got 9"),
    ("prune.allocate:method=obs", "prune.allocate: method must be one of owl, dp, got 'obs'"),
    ("prune.allocate:method=dp,sparsity=0.97", "prune.allocate: method=dp: sparsity must be at most 0.95"),
    ("prune.allocate:weighting=hessian", "prune.allocate: weighting must be fisher or none"),
    ("prune.allocate:criterion=taylor", "prune.allocate: criterion must be one of wanda, sparsegpt, magnitude"),
    ("prune.allocate:max_deviation=0.5", r"prune.allocate: max_deviation must be in \[0, 0.5\), got 0.5"),
    ("prune.allocate:outlier_m=0", "prune.allocate: outlier_m must be > 0, got 0.0"),
])
def test_bad_options(spec, message):
    assert_bad_option(spec, message)


def test_m_not_dividing_the_input_dim_names_the_layer():
    assert_one_line_error(["prune.nm:n=2,m=3"], r"prune.nm: m=3 does not divide the input dim 64 of "
                                                 r"'model.layers.0.self_attn.q_proj'")
    assert_one_line_error(["prune.nm:targets=conv"], r"prune.nm: m=4 does not divide the input dim 27 of 'stem.0'",
                          model="cnn")


def test_only_the_head_selected():
    assert_one_line_error(["prune.magnitude:targets=linear"], "prune.magnitude: targets 'linear' select only "
                                                              "output layers", model="cnn")


def test_cli_bad_sparsity(capsys, no_capture, llama_hf_dir, tmp_path):
    from zoo_graphs import assert_error

    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "prune.magnitude:sparsity=1.5", "-o", out],
                 "prune.magnitude: sparsity must be in [0, 1)", absent=[out])


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_owl_allocation(llama, criterion):
    """OWL: blocks with more outliers keep more weights, the mean ratio is the target, each block
    is pruned at its ratio."""
    _, g, cal = llama
    out = g.apply(f"prune.allocate:sparsity=0.5,criterion={criterion}", calibration=cal)
    rep = out.history[-1]["report"]
    ratios, outliers = rep["allocated"], rep["outlier_ratio"]
    assert sum(ratios.values()) / len(ratios) == pytest.approx(0.5, abs=1e-3)
    assert max(ratios.values()) - min(ratios.values()) == pytest.approx(0.16, abs=1e-3)  # 2 × max_deviation
    most = max(outliers, key=outliers.get)
    assert ratios[most] == min(ratios.values())
    for key, keep in out.masks.items():
        block = key.rsplit(".", 2)[0]
        assert 1 - float(keep.float().mean()) == pytest.approx(ratios[block], abs=0.02)
    assert _zero_where_pruned(out)


def test_dp_allocation(llama):
    """method=dp: per-layer sparsities whose weighted mean meets the target, each layer pruned at its
    own, and a held-out KL no worse than uniform Wanda's at the same overall sparsity."""
    zm, g, cal = llama
    out = g.apply("prune.allocate:sparsity=0.6,method=dp", calibration=cal)
    rep = out.history[-1]["report"]
    sizes = {t: g.tensor(t).numel() for t in rep["allocated"]}
    mean = sum(rep["allocated"][t] * n for t, n in sizes.items()) / sum(sizes.values())
    assert 0.6 <= mean < 0.61 and len(set(rep["allocated"].values())) > 1
    assert rep["sparsity"] == pytest.approx(mean, abs=0.01)
    layers = weight_layers(out)
    for key, keep in out.masks.items():
        target = layers[key].args[1].target
        assert 1 - float(keep.float().mean()) == pytest.approx(rep["allocated"][target], abs=0.02)
    held = calibration(zm, g, n=4, seq=32, seed=100)
    uniform = g.apply("prune.wanda:sparsity=0.6", calibration=cal)
    assert mean_kl(g, out, held) <= mean_kl(g, uniform, held)


def test_dp_solves_the_knapsack_exactly():
    import itertools

    import numpy as np

    from splice.passes.prune._layer_dp import BUDGET_UNITS, LEVELS, dp_levels

    rng = np.random.default_rng(0)
    sizes = np.array([1.0, 2.0, 1.0, 3.0])
    table = rng.uniform(0, 1, (4, len(LEVELS))).cumsum(1)
    cost = np.rint(np.outer(sizes / sizes.sum(), LEVELS) * BUDGET_UNITS).astype(int)
    best = min(sum(table[i, c] for i, c in enumerate(combo)) for combo in itertools.product(range(len(LEVELS)), repeat=4)
               if sum(cost[i, c] for i, c in enumerate(combo)) >= BUDGET_UNITS // 2)
    levels = dp_levels(table, sizes, 0.5)
    assert sum(table[i, c] for i, c in enumerate(levels)) == pytest.approx(best)
