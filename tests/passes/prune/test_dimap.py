"""``prune.dimap`` (DIMAP): the information-distortion importance, modules from the coupling
analysis, each module pruned to the target by one global ranking, the magnitude order kept inside
each layer."""
import pytest
import torch
from zoo_graphs import captured

from splice.ir.sparsity import weight_layers
from splice.ir.weights import dense_weight
from splice.passes.prune.dimap import distortion_importance


def test_importance_is_the_papers():
    w = torch.tensor([[0.5, -2.0], [1.0, 0.1]])
    # sorted by magnitude: 2.0, 1.0, 0.5, 0.1 -> squares 4, 1, 0.25, 0.01; cumulative 4, 5, 5.25, 5.26
    expected = torch.tensor([[0.25 / 5.25, 1.0], [1 / 5, 0.01 / 5.26]], dtype=torch.float64)
    torch.testing.assert_close(distortion_importance(w), expected)


@pytest.mark.parametrize("model", ["vit", "llama"])
def test_modules_are_pruned_to_the_target(model):
    _, g = captured(model)
    out = g.apply("prune.dimap:sparsity=0.5")
    rep = out.history[-1]["report"]
    assert set(rep["modules"]) >= {"qkv", "prj", "mlp"}
    layers = weight_layers(out)
    by_module: dict[str, list] = {}
    from splice.passes.prune.dimap import module_of

    modules = module_of(g, [layers[k] for k in out.masks])
    for key, keep in out.masks.items():
        by_module.setdefault(modules[layers[key].args[1].target], []).append(keep)
        w = dense_weight(g, weight_layers(g)[key]).abs()
        if (~keep).any() and keep.any():  # within a layer the magnitude order is kept
            assert float(w[~keep].max()) <= float(w[keep].min()) + 1e-7
    for name, keeps in by_module.items():
        pruned = sum(int((~k).sum()) for k in keeps) / sum(k.numel() for k in keeps)
        assert pruned == pytest.approx(0.5, abs=0.01), name
    assert len({round(1 - float(k.float().mean()), 2) for k in out.masks.values()}) > 1  # layers differ
