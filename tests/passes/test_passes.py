"""Registry-driven: every registered pass runs on every zoo model with its test config.

The fast suite (CI) runs each pass on two of the zoo models it applies to (its declared
``applies``; the merge passes, which share one driver, on one), rotating so every model is exercised by many passes. The first
of the two also saves and loads the result and checks ONNX Runtime parity (an export is most of a case's
time), unless ``ONNX_AS`` names a pass of its family whose fast case exports the same ops: the case then
runs that pass on the same graph and asserts it adds no op (with its constant arguments) that the other
does not. ``-m slow`` runs the whole pass × model matrix, every case with save/load and ONNX. What a pass declares it needs comes from the registry
too: the passes its ``requires`` name run first, and each graph it reads (``graphs``) is the
model itself.
Checks structure (the pass created nodes, or replaced or removed stored tensors, and the graph verifies), numerics (a cosine
floor against the original for lossy passes), config round-trip, save/load bit-identity,
and ONNX Runtime parity of the result.
"""
import json

import pytest
import torch

import splice
from splice.eval import zoo
from splice.ir.graph import set_attr
from splice.ir.metrics import compare_outputs
from splice.passes.base import config_from_json, config_to_json, get_pass, list_passes, providers
from splice.passes.spec import format_spec, parse_spec
from zoo_graphs import captured, input_grid

PASSES = [p.name for p in list_passes()]
COSINE_FLOOR = {"prune.depth": 0.6, "prune.heads": 0.8,  # one of a zoo model's 2 blocks / 2 KV groups goes
                "prune.channels": 0.8,  # a quarter of a tiny random CNN's channels
                "prune.dpruner": 0.8,  # gradients of a random model (loss at max entropy) rank weights poorly
                "recurse.slice": 0.7, "share.layers": 0.7}  # a zoo model's 2 random blocks share their average
COSINE_FLOOR["lowrank.dsformer"] = 0.7  # a quarter of the rank, 4 non-zeros per column: random weights have flat spectra
SETUP = {"prune.gates": ["prune.channels:mode=gates,amount=0.25"]}  # a setup that needs options (no gate closed:
#                                                                   prune.gates then folds them and removes none)
SETUP["lowrank.eora"] = ["quantize.rtn:bits=3,group_size=16"]  # a compressed layer to compensate (the float model is its original)


# pass -> a pass of its family whose fast case checks ONNX Runtime parity on the same ops: the fast
# case of the key runs it on its graph and asserts its own output adds no other op (``_onnx_ops``).
# Outputs of only the captured model's aten ops (weights, shapes or blocks changed) stand on one
# such pass per family (and tests/runtime/test_onnx.py, every zoo model fp32, int4 and int8).
ONNX_AS = {
    "adapter.extract": "adapter.lora", "adapter.peft": "adapter.lora", "adapter.unfold": "adapter.adalora",
    "adapter.sara": "adapter.lift",
    "delta.apply": "delta.extract", "delta.dare": "delta.extract", "delta.scale": "delta.extract",
    "delta.bitstack": "delta.bitdelta",
    "instrument.observe": "instrument.strip",
    "prune.allocate": "prune.magnitude", "prune.bip_finish": "prune.magnitude", "prune.dimap": "prune.magnitude",
    "prune.dpruner": "prune.magnitude", "prune.nm": "prune.magnitude", "prune.sparsegpt": "prune.magnitude",
    "prune.wanda": "prune.magnitude", "prune.depth": "prune.heads", "prune.gates": "prune.channels",
    "quantize.convert": "quantize.rtn", "quantize.discquant": "quantize.rtn", "quantize.gptq": "quantize.rtn",
    "quantize.pvtune": "quantize.rtn", "quantize.reconstruct": "quantize.rtn",
}  # not quantize.awq (group size 32 and its input scales) nor quantize.smoothquant (a mul on vit): own ONNX


def _models(name: str) -> tuple[str, ...]:
    """The zoo models pass ``name`` declares it applies to."""
    info = get_pass(name)
    return tuple(m for m in zoo.ZOO_NAMES if info.applies is None or info.applies_to(captured(m)[1]))


def _setup(name: str) -> list[str]:
    """Passes that meet ``name``'s ``requires`` (and theirs), in order: a capability by the first
    pass that provides it (e.g. adapter.fold needs an adapter)."""
    steps = []
    for need in get_pass(name).requires:
        first = need if need in PASSES else providers(need)[0]
        steps += [s for s in _setup(first) + [first] if s not in steps]
    return steps


def _merge_spec(name: str, graph):
    """A merge pass's config and inputs: the model (the base where the method takes one) and as
    many perturbed copies as the method needs; its required parameters at 0.5."""
    from splice.passes.merge._common import METHODS, REQUIRED

    method = METHODS.get(name.split(".", 1)[1])
    if method is None:  # a pass of the family that is no merge (merge.rmm_select)
        return name, {}
    others = method.min_models if method.base != "ignored" else max(method.min_models - 1, 1)
    inputs = [graph] + [_perturbed(graph, seed) for seed in range(others)]
    params = {p.name: 0.5 for p in method.params if p.default is REQUIRED}
    info = get_pass(name)
    options = {"base": 0, "parameters": json.dumps(params)}
    if method.name == "passthrough":  # the whole stack from the perturbed copy
        from splice.ir.blocks import stack

        options = {"slices": json.dumps([{"sources": [{"input": 1, "layer_range": [0, len(stack(graph, name))]}]}])}
    return (info, info.make_config(options)), {"inputs": inputs}


def _perturbed(graph, seed: int):
    """A copy of ``graph`` with every float tensor moved by 0.002·N(0, 1)."""
    other, gen = graph.copy(), torch.Generator().manual_seed(seed)
    for target, t in graph.tensors().items():
        if t.is_floating_point():
            set_attr(other.gm, target, t.detach() + 0.002 * torch.randn(t.shape, generator=gen))
    return other


def _delta_spec(name: str, graph):
    """A delta pass's spec and graphs: the model is the fine-tuned one, a perturbed copy its base
    (delta.extract, the others' setup); delta.signature adds one block of a second copy's delta."""
    spec = "delta.signature:layers=1" if name == "delta.signature" else name
    return spec, {"base": _perturbed(graph, 0), "source": _perturbed(graph, 1)}


def _run_setup(setup: list[str], graph):
    """``graph`` after the ``setup`` passes (a merge pass merges perturbed copies of it: ``_merge_spec``)."""
    for step in setup:
        spec, graphs = (_delta_spec if step.startswith("delta.") else _merge_spec)(step, graph)
        graph = splice.Pipeline([spec]).run(graph, graphs=graphs, probe=False).graph
    return graph


def _calibration(zm, graph):
    kw = zm.make_inputs(2, 64, seed=1)  # 128 tokens: one per input feature of the widest layer
    return [tuple(kw[n] for n in graph.input_names)]


@pytest.mark.parametrize("name", PASSES)
def test_config_round_trip(name):
    info = splice.passes.base.get_pass(name)
    cfg = info.make_config({})
    info2, cfg2 = config_from_json(config_to_json(name, cfg))
    assert info2 is info and cfg2 == cfg
    assert parse_spec(format_spec(info, cfg))[1] == cfg
    assert info.reference.startswith("https://")


def _weights_only_merge(name: str) -> bool:
    """A merge method run by the shared tensor-wise driver that only replaces stored tensors (no new
    ops), other than ``merge.linear``, which stands for them in the fast suite's ONNX checks, and
    ``merge.passthrough``, which the matrix runs with slices (a restacked block stack)."""
    from splice.passes.merge._common import METHODS

    method = METHODS.get(name.removeprefix("merge.")) if name.startswith("merge.") else None
    return (method is not None and method.install is None and name not in ("merge.linear", "merge.passthrough")
            and get_pass(name).fn.__name__ == "tensorwise")


# what a case checks beyond running the pass: "onnx" save/load and ONNX parity; "save" save/load,
# ONNX by another pass (``ONNX_AS``, or merge.linear for the weights-only merges); "run" neither
# (a pass's second model in the fast suite: its first checks them)
ONNX, SAVE, RUN = "onnx", "save", "run"


def _matrix() -> list:
    """(pass, model, checks) cases: fast ones for two models per pass, save/load and ONNX on the first;
    the rest slow."""
    cases = []
    for i, name in enumerate(PASSES):
        models = _models(name)
        with_onnx, without = models[i % len(models)], models[(i + len(models) // 2) % len(models)]
        if _weights_only_merge(name) or name in ONNX_AS:  # the ops another fast case exports: ONNX there, here slow
            cases.append(pytest.param(name, with_onnx, SAVE, id=f"{name}-{with_onnx}-no-onnx"))
            cases.append(pytest.param(name, with_onnx, ONNX, id=f"{name}-{with_onnx}", marks=pytest.mark.slow))
        else:
            cases.append(pytest.param(name, with_onnx, ONNX, id=f"{name}-{with_onnx}"))
        if without != with_onnx:  # merge (delta) passes share one driver: their second model runs in the slow set
            marks = [pytest.mark.slow] if name.startswith(("merge.", "delta.")) else []
            cases.append(pytest.param(name, without, RUN, id=f"{name}-{without}-no-onnx", marks=marks))
            cases.append(pytest.param(name, without, ONNX, id=f"{name}-{without}", marks=pytest.mark.slow))
        cases += [pytest.param(name, model, ONNX, id=f"{name}-{model}", marks=pytest.mark.slow)
                  for model in models if model not in (with_onnx, without)]
    return cases


def _onnx_ops(graph) -> set:
    """The ops an ONNX export of ``graph`` translates: aten ops by name, splice ops with their
    constant (non-tensor) arguments, which their translations read."""
    def const(a):
        return "node" if isinstance(a, torch.fx.Node) else repr(a)

    ops = set()
    for n in graph.gm.graph.nodes:
        op = str(n.target).replace(".default", "")
        if n.op == "call_function" and op != "splice.observe":  # observers: stripped before an export
            ops.add((op,) + ((tuple(map(const, n.args)), tuple((k, const(v)) for k, v in n.kwargs.items()))
                             if op.startswith("splice.") else ()))
    return ops


def _apply(name, zm, graph, tmp_path):
    """Pass ``name`` on ``graph`` as the matrix runs it: (setup, its input, the result)."""
    info = splice.passes.base.get_pass(name)
    calib = _calibration(zm, graph) if info.calibrated(info.config_cls()) else None
    setup = SETUP.get(name) or _setup(name)
    start = _run_setup(setup, graph)
    spec = name
    if name == "adapter.peft":  # reads a PEFT directory: one saved from a (zero-init) LoRA on this model
        spec = f"{name}:path={splice.save_peft(graph.apply('adapter.lora'), tmp_path / 'peft')}"
    datasets = {name: _calibration(zm, graph) for name in info.datasets}
    graphs = {g: graph for g in info.graphs}
    if name.startswith("merge."):
        spec, graphs = _merge_spec(name, graph)
    elif name.startswith("delta."):
        spec, graphs = _delta_spec(name, graph)
    return setup, start, splice.Pipeline([spec]).run(start, calibration=calib, graphs=graphs, datasets=datasets).graph


@pytest.mark.parametrize(("name", "model", "checks"), _matrix())
def test_pass_on_zoo(name, model, checks, tmp_path):
    zm, graph = captured(model)
    setup, start, out = _apply(name, zm, graph, tmp_path)
    entry = out.history[-1]
    assert entry["pass"] == name and entry["seconds"] >= 0
    assert graph.history == [] and out is not start  # the input graph is untouched
    # provenance: every node the pass created is marked (a pass that only removes what its setup
    # added, like instrument.strip, gives back the original ops instead)
    created = [n for n in out.gm.graph.nodes if n.meta.get("splice_pass") == name]
    before, after = start.tensors(), out.tensors()  # ... or, pruning, it replaced or removed stored tensors
    replaced = [k for k, t in after.items() if before.get(k) is not t] + [k for k in before if k not in after]
    assert created or replaced or out.op_counts() == graph.op_counts() != start.op_counts(), "pass changed nothing"
    fid = compare_outputs(graph.run(*graph.example_inputs), out.run(*graph.example_inputs))
    assert all(f["cosine"] > COSINE_FLOOR.get(name, 0.9) for f in fid.values()), fid
    if checks == RUN:
        return
    # save -> load is bit-identical and keeps the history
    out.save(tmp_path / "art")
    back = splice.load(tmp_path / "art")
    assert [h["pass"] for h in back.history] == [s.split(":")[0] for s in setup] + [name]
    for inputs in input_grid(zm, graph)[:2]:
        a, b = out.run(*inputs), back.run(*inputs)
        assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["passes"][-1]["config"] == entry["config"]
    # ONNX Runtime parity at two batch sizes and two sequence lengths (observers: stripped by a pass first)
    if name in ONNX_AS:  # its ONNX check is the other pass's: it exports every op this output has
        other = _apply(ONNX_AS[name], zm, graph, tmp_path / "as")[2]
        assert _onnx_ops(out) <= _onnx_ops(other) | _onnx_ops(graph), sorted(_onnx_ops(out) - _onnx_ops(other))
    if checks != ONNX:
        return
    if "splice.observe" in out.op_counts():
        out = splice.Pipeline(["instrument.strip"]).run(out, probe=False).graph
    onnx_path = splice.export_onnx(out, tmp_path / "m.onnx")
    assert splice.parity(out, onnx_path, input_grid(zm, graph)) <= 1e-4


def test_onnx_as_names_passes_whose_fast_case_exports():
    """Each pass ``ONNX_AS`` leans on checks ONNX in the fast suite and applies to every model the
    leaning pass does (its fast case runs there, beside it)."""
    fast_onnx = {p.values[0] for p in _matrix() if p.values[2] == ONNX and not p.marks}
    for name, other in ONNX_AS.items():
        assert other in fast_onnx and set(_models(name)) <= set(_models(other)), (name, other)
