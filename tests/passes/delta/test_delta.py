"""``delta.*``: a zoo Llama fine-tuned here for a few steps on a next-token rule (its base: the same
model before), the delta extracted, compressed, scaled, folded, saved without its base and loaded
onto it. Numbers checked: exact reconstruction at full budget, compression ratios and the share of the
fine-tuning's loss gain each compressed delta keeps on held-out inputs, BitStack's loss falling with
its byte budget, delta-only artifacts bit-identical with the right base and refused with a wrong one.
ONNX Runtime parity of every delta op: the registry matrix (``tests/passes/test_passes.py``)."""
import copy
import json

import pytest
import torch

import splice
from splice.errors import ConfigError
from splice.ir.graph import get_attr, set_attr, weights_digest
from zoo_graphs import assert_one_line_error, captured

VOCAB = 256


def _batch(seed: int, batch: int = 4, seq: int = 32) -> torch.Tensor:
    """Token windows following ``t[i+1] = (5·t[i] + 3) mod 256`` from random starts."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=torch.Generator().manual_seed(seed))
    ids = [start]
    for _ in range(seq - 1):
        ids.append((ids[-1] * 5 + 3) % VOCAB)
    return torch.cat(ids, 1)


def _inputs(ids: torch.Tensor) -> tuple:
    return ids, torch.ones_like(ids)


def loss(graph, seeds=range(100, 104)) -> float:
    """Mean next-token loss on held-out windows."""
    total = 0.0
    for s in seeds:
        ids = _batch(s)
        logits = graph.run(*_inputs(ids))["logits"]
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))
    return total / len(seeds)


@pytest.fixture(scope="module")
def models():
    """(base graph, fine-tuned graph, the fine-tuned graph as base + dense delta)."""
    zm, base = captured("llama")  # the session's capture (zoo seed 0)
    model = copy.deepcopy(zm.model).requires_grad_(True)  # the base graph shares zm.model's tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(30):
        ids = _batch(step)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss_ = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss_.backward()
        opt.step()
    ft = base.copy()  # the trained weights under the same names (one capture is a third of this file's time)
    for target in base.tensors():
        set_attr(ft.gm, target, get_attr(model, target).detach())
    delta = run(ft, "delta.extract", graphs={"base": base})
    return base, ft, delta


def run(graph, *specs, **kwargs):
    """``graph`` after ``specs`` (no fidelity probe: the tests compare outputs themselves)."""
    return splice.Pipeline(list(specs)).run(graph, probe=False, **kwargs).graph


def _max_weight_diff(a, b) -> float:
    ta, tb = a.tensors(), b.tensors()
    return max(float((ta[k] - tb[k]).abs().max()) for k in tb if tb[k].is_floating_point())


def _logits(graph):
    return graph.run(*_inputs(_batch(7)))["logits"]


def recovered(base, ft, graph) -> float:
    """Share of the fine-tuning's held-out loss gain ``graph`` keeps."""
    lb, lf = loss(base), loss(ft)
    return (lb - loss(graph)) / (lb - lf)


def test_extract_then_apply_reproduces_the_fine_tuned_model(models):
    base, ft, delta = models
    entry = delta.history[-1]
    assert entry["report"]["base_weights_sha256"] == weights_digest(base) == delta.source["delta_base"]["weights_sha256"]
    assert entry["report"]["tensors"] > 0
    assert float((_logits(delta) - _logits(ft)).abs().max()) <= 1e-5  # base + (ft − base): within an ulp
    assert delta.bytes_by_role()["delta_base"] > 0 and "delta" in delta.bytes_by_role()
    folded = run(delta, "delta.apply")
    assert sorted(folded.tensors()) == sorted(ft.tensors())
    assert _max_weight_diff(folded, ft) <= 1e-5
    assert float((_logits(folded) - _logits(ft)).abs().max()) <= 1e-5
    assert "delta_base" not in folded.source


def test_a_full_budget_delta_reproduces_the_weights(models):
    _, ft, delta = models
    out = run(delta, "delta.svd:rank=100000")  # capped at full rank
    assert out.history[-1]["report"]["rel_error"] <= 1e-5
    assert _max_weight_diff(run(out, "delta.apply"), ft) <= 1e-5
    errors = [run(delta, f"delta.bitstack:levels={n}").history[-1]["report"]["rel_error"] for n in (1, 4)]
    assert errors[1] < 0.5 * errors[0], errors  # converging with its levels


def test_compressed_deltas_report_ratio_error_and_recover_the_loss(models):
    base, ft, delta = models
    assert loss(ft) < loss(base) - 2  # the fine-tuning learned the rule
    for spec, ratio, keeps in [("delta.compeft:density=0.2,alpha=2", 20, 0.5), ("delta.bitdelta", 15, 0.6),
                               ("delta.bitstack:levels=4", 4, 0.9), ("delta.svd:rank=8", 4, 0.4)]:
        out = run(delta, spec)
        report = out.history[-1]["report"]
        assert report["compression"] >= ratio, (spec, report)
        assert report["delta_bytes_after"] == out.bytes_by_role()["delta"] - _dense_1d_bytes(out)
        assert 0 < report["rel_error"] < 1
        assert recovered(base, ft, out) >= keeps, (spec, recovered(base, ft, out))


def test_compeft_least_squares_scale_has_the_least_error(models):
    _, _, delta = models
    errors = {a: run(delta, f"delta.compeft:density=0.2,alpha={a}").history[-1]["report"]["rel_error"]
              for a in (0, 1, 2, 4)}
    assert errors[0] <= min(errors.values()), errors  # the best scale for the kept entries and their signs


def _dense_1d_bytes(graph) -> int:
    """Bytes of the 1-D deltas (norms) the compressors leave dense."""
    return sum(t.numel() * t.element_size() for name, t in graph.tensors().items()
               if name.startswith("delta.") and graph.tensor(name.replace("delta.", "delta_base.", 1).rsplit(".", 1)[0]).dim() < 2)


def test_bitstack_truncated_to_a_budget_loses_loss_monotonically(models):
    base, ft, delta = models
    full = run(delta, "delta.bitstack:levels=8")
    full_bytes = full.history[-1]["report"]["delta_bytes_after"]
    losses = []
    for share in (0.25, 0.5, 0.75):
        cut = run(full, f"delta.bitstack:budget={share}")  # a stack is truncated by dropping levels
        report = cut.history[-1]["report"]
        assert report["delta_bytes_after"] <= share * full_bytes
        losses.append(loss(cut))
    losses.append(loss(full))
    assert losses == sorted(losses, reverse=True), losses
    assert loss(base) > losses[0]


def test_delta_only_artifact_round_trip_and_wrong_base(models, tmp_path):
    base, ft, delta = models
    small = run(delta, "delta.bitdelta")
    small.save(tmp_path / "d", delta_only=True)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["delta_only"]["base_weights_sha256"] == weights_digest(base)
    assert "delta_base" not in manifest["bytes_by_role"]
    back = splice.load(tmp_path / "d", base=base)
    for seed in (1, 2):
        x = _inputs(_batch(seed, 2, 9))
        assert torch.equal(back.run(*x)["logits"], small.run(*x)["logits"])
    digest = weights_digest(base)[:16]
    for wrong, what in [(ft, "wrong base.*" + digest), (None, "give its base model.*" + digest)]:
        with pytest.raises(ConfigError, match=what) as err:
            splice.load(tmp_path / "d", base=wrong)
        assert "\n" not in str(err.value) and str(tmp_path / "d") in str(err.value)


@pytest.mark.slow
def test_delta_only_artifacts_are_small_restack_and_take_a_base_path(models, tmp_path):
    base, ft, delta = models
    stack = run(delta, "delta.bitstack:levels=8")
    stack.save(tmp_path / "d", delta_only=True)
    stack.save(tmp_path / "full")
    assert (tmp_path / "d" / "program.pt2").stat().st_size < (tmp_path / "full" / "program.pt2").stat().st_size
    base.save(tmp_path / "base")
    back = splice.load(tmp_path / "d", base=tmp_path / "base")
    assert torch.equal(_logits(back), _logits(stack))
    for share in (0.25, 0.5):  # truncating a loaded stack is truncating the stack
        assert torch.equal(_logits(run(back, f"delta.bitstack:budget={share}")),
                           _logits(run(stack, f"delta.bitstack:budget={share}")))
    with pytest.raises(ConfigError, match="not a delta-only artifact"):
        splice.load(tmp_path / "full", base=base)
    signed = run(base, "delta.signature:layers=1", graphs={"base": base, "source": ft})  # a signature alone
    signed.save(tmp_path / "sig", delta_only=True)
    assert torch.equal(_logits(splice.load(tmp_path / "sig", base=base)), _logits(signed))


def test_scale_and_dare(models):
    base, ft, delta = models
    assert torch.equal(_logits(run(delta, "delta.scale:factor=0")), _logits(base))
    half = run(delta, "delta.scale:factor=0.5", "delta.apply")
    want = {k: (base.tensors()[k] + ft.tensors()[k]) / 2 for k in ft.tensors() if ft.tensors()[k].is_floating_point()}
    assert max(float((half.tensors()[k] - w).abs().max()) for k, w in want.items()) <= 1e-6
    a, b = run(delta, "delta.dare:density=0.3,seed=4"), run(delta, "delta.dare:density=0.3,seed=4")
    assert torch.equal(_logits(a), _logits(b))
    report = a.history[-1]["report"]
    assert abs(report["kept"] - 0.3) < 0.02
    assert not torch.equal(_logits(a), _logits(run(delta, "delta.dare:density=0.3,seed=5")))


def test_bitdelta_scale_distillation_lowers_the_output_error(models):
    _, ft, delta = models
    calib = [_inputs(_batch(200 + i, 2, 16)) for i in range(2)]
    plain = run(delta, "delta.bitdelta")
    tuned = run(delta, "delta.bitdelta:distill_steps=20,lr=0.001", calibration=calib)
    report = tuned.history[-1]["report"]
    assert report["distill_loss_last"] < report["distill_loss_first"]
    err = [float((_logits(g) - _logits(ft)).pow(2).mean()) for g in (plain, tuned)]
    assert err[1] < err[0], err


def _perturbed(graph, seed, eps=0.01):
    out, gen = graph.copy(), torch.Generator().manual_seed(seed)
    for target, t in graph.tensors().items():
        if t.is_floating_point():
            set_attr(out.gm, target, t.detach() + eps * torch.randn(t.shape, generator=gen))
    return out


def test_signature_added_combined_and_removed(models):
    base, ft, _ = models
    robust, other = _perturbed(base, 1), _perturbed(base, 2, 0.003)

    def sign(graph, strength, source=robust):
        spec = f"delta.signature:layers=1,bits=8,strength={strength}"
        return run(graph, spec, graphs={"base": base, "source": source})

    signed = sign(other, 1)
    report = signed.history[-1]["report"]
    assert report["tensors"] > 0 and report["delta_base_sha256"] == weights_digest(other)
    first = {k for k in robust.tensors() if k.startswith("model.layers.0.")}
    folded = run(signed, "delta.apply")
    for k in first:  # the first block got the (8-bit) signature, the rest is untouched
        want = other.tensors()[k] + robust.tensors()[k] - base.tensors()[k]
        assert float((folded.tensors()[k] - want).abs().max()) <= 0.02 * float((robust.tensors()[k] - base.tensors()[k]).abs().max()) + 1e-7
    assert all(torch.equal(folded.tensors()[k], other.tensors()[k]) for k in other.tensors() if k.startswith("model.layers.1."))
    assert torch.equal(_logits(sign(signed, -1)), _logits(other))  # removed exactly
    both = sign(signed, 1, ft)  # two signatures combined: their sum, re-quantized
    assert both.history[-1]["report"]["tensors"] > 0


def test_bad_inputs_are_one_line_errors(models):
    base, ft, delta = models
    for spec, message in [("delta.dare:density=0", "delta.dare: density must be in \\(0, 1\\], got 0"),
                          ("delta.compeft:density=1.5", "delta.compeft: density must be in \\(0, 1\\]"),
                          ("delta.bitstack:levels=0", "delta.bitstack: levels must be >= 1"),
                          ("delta.svd:rank=0", "delta.svd: rank must be >= 1"),
                          ("delta.signature:bits=9", "delta.signature: bits must be 2..8"),
                          ("delta.apply", "delta.apply: requires delta")]:
        assert_one_line_error([spec], message)
    with pytest.raises(ConfigError, match="delta.apply: the graph carries no weight delta") as err:
        splice.run_pass(ft, splice.passes.base.get_pass("delta.apply"), splice.passes.base.get_pass("delta.apply").make_config())
    assert "\n" not in str(err.value)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    other_arch = splice.capture(mlp, (torch.randn(2, 4),))
    for graph, other, message in [(ft, other_arch, "delta.extract: the fine-tuned model is not the architecture of base"),
                                  (delta, base, "delta.extract: the graph already carries weight deltas")]:
        with pytest.raises(ConfigError, match=message) as err:
            splice.Pipeline(["delta.extract"]).run(graph, graphs={"base": other}, probe=False)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="delta.extract: option base is required"):
        splice.Pipeline(["delta.extract"]).run(ft, probe=False)
    with pytest.raises(ConfigError, match="delta_only needs a graph that carries deltas"):
        ft.save("/nonexistent-never-written", delta_only=True)


def test_cli_saves_a_delta_only_artifact_that_finds_its_base(models, tmp_path, capsys):
    from zoo_graphs import assert_error, run_cli

    base, ft, _ = models
    base.save(tmp_path / "base")
    ft.save(tmp_path / "ft")
    out = tmp_path / "d"
    rc, _, err = run_cli(capsys, "run", tmp_path / "ft", "-p", f"delta.extract:base={tmp_path / 'base'}",
                         "-p", "delta.bitdelta", "-o", out, "--delta-only")
    assert rc == 0, err
    assert json.loads((out / "manifest.json").read_text())["delta_only"]["base_path"] == str(tmp_path / "base")
    back = splice.load(out)  # the base is read from where delta.extract found it, its digest checked
    assert torch.equal(_logits(back), _logits(run(ft, "delta.extract", "delta.bitdelta", graphs={"base": base})))
    (tmp_path / "base").rename(tmp_path / "moved")
    assert_error(capsys, ["inspect", out], "holds a delta only; give its base model")
    rc, _, err = run_cli(capsys, "run", tmp_path / "ft", "-p", "adapter.lora", "-o", tmp_path / "x", "--delta-only")
    assert rc == 1 and "delta_only needs a graph that carries deltas" in err and not (tmp_path / "x").exists()
