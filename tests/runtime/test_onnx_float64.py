"""The ONNX translations of every adapter op compute what the torch ops compute, to double rounding.

fp32 parity (``tests/passes/test_passes.py``, <= 1e-4) cannot tell a translation's error from fp32 noise;
``splice.runtime.float64`` runs the same lowering on the graph's float64 twin, where the two agree
to ~1e-13 unless a translation differs (a wrong operand, a float32 constant, another formula).
"""
import pytest
import torch
from zoo_graphs import captured, input_grid

from splice.passes.adapters.api import adapter_parameters
from splice.passes.adapters._common import adapter_passes
from splice.runtime.float64 import double_module, double_parity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXACT = 1e-10
# AdaLoRA: the exporter's optimizer (onnxscript) folds the 0-d ``alpha / ranknum`` into the A ⊙ E
# initializer at float32-level precision (0 with ``optimize=False``; docs/bench_adapters_onnx.md)
FOLDED_SCALAR = {"adapter.adalora": 1e-7}
CONV_ONLY = {"adapter.flora"}  # and ORT has no float64 Conv kernel
# the fast suite checks one adapter per kind of op (low-rank delta, base-reading, factored, sparse,
# shared-matrix); -m slow runs every adapter (each costs two exports, ~25 s on 2 cores)
IN_CI = {"adapter.lora"}  # a factored delta (DoRA, which reads the base, and the rest: -m slow)


def _adapter_passes() -> list[str]:
    """Passes that insert an adapter into a llama at their default config."""
    return [name for name, reads_source in adapter_passes().items() if not reads_source and name not in CONV_ONLY]


def _perturbed(graph, name: str):
    out = graph.apply(name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(out).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return out


def _float32_casts(gm) -> list:
    return [n for n in gm.graph.nodes if any(a is torch.float32 for a in (*n.args, *n.kwargs.values()))]


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_double_module_widens_the_graphs_own_float32_casts(model):
    _, g = captured(model)  # Llama's RMSNorm and rotary casts (args), GPT-2's mask cast (kwargs)
    assert _float32_casts(g.gm)
    gm = double_module(g.gm)
    assert not _float32_casts(gm)
    assert {p.dtype for p in gm.parameters()} == {torch.float64}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in IN_CI else pytest.mark.slow)
                                  for n in _adapter_passes()])
def test_adapter_translation_is_exact_in_float64(name):
    zm, g = captured("llama")
    adapted = _perturbed(g, name)
    inputs = input_grid(zm, g)[1:3]
    bound = FOLDED_SCALAR.get(name, EXACT)
    for graph in (adapted, adapted.apply("adapter.fold")):
        got = double_parity(graph, inputs)
        assert got["max_abs_diff"] <= bound * max(1.0, got["max_abs_output"])
