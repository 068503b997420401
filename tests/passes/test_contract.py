"""Pass contract v2: what the Pipeline checks before running (requires, versions, other graphs),
instruments, the shared-analysis cache, declared report fields and applicability, Graph.apply,
and the spec/recipe bad inputs. Each bad input is a one-line error naming what is at fault."""
from dataclasses import dataclass

import pytest
import torch
from zoo_graphs import calibration, captured

import splice
from splice.errors import ConfigError, SpliceError
from splice.ir.graph import set_attr
from splice.passes import base
from splice.passes.analysis import AnalysisCache, value_fingerprints
from splice.passes.base import PassConfig, PassResult, PassVersionError, check_history, report_summary
from splice.passes.instruments import PassInstrument
from splice.passes.manager import Pipeline
from splice.passes.instrument.calibrate import input_hessians
from splice.passes.spec import load_recipe, parse_spec


@dataclass(frozen=True, kw_only=True)
class _Cfg(PassConfig):
    """test pass"""


@pytest.fixture
def register(monkeypatch):
    def add(name, fn, **kw):
        info = base.PassInfo(name, _Cfg, fn, "https://example.org", kw.pop("needs_calibration", False),
                             kw.pop("version", 1), **kw)
        monkeypatch.setitem(base._REGISTRY, name, info)
        return info
    return add


class _Seen(PassInstrument):
    def __init__(self):
        self.calls = []

    def before_pipeline(self, graph, ctx):
        self.calls.append(("start", ctx.target))

    def before_pass(self, graph, info, cfg):
        self.calls.append(("before", info.name))

    def after_pass(self, graph, info, cfg, result, entry):
        self.calls.append(("after", info.name, entry["modified"]))

    def after_pipeline(self, graph, entries):
        self.calls.append(("end", len(entries)))


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and len(text) < 400, text
    return text


# ------------------------------------------------------------------ requires


@pytest.mark.parametrize("steps,needle", [
    (["quantize.convert"], "quantize.convert: requires quantize.qat earlier in the pipeline or in the graph's history"),
    (["quantize.rtn", "adapter.unfold"], "adapter.unfold: requires adapter.fold earlier in the pipeline"),
    (["adapter.fold"], "adapter.fold: requires adapter (a pass providing it: adapter.adalora, adapter.bone"),
])
def test_requires_is_checked_before_anything_runs(steps, needle):
    _, g = captured("llama")
    seen = _Seen()
    with pytest.raises(ConfigError) as e:
        Pipeline(steps).run(g, instruments=[seen])
    assert needle in _one_line(e) and seen.calls == []


def test_requires_is_met_by_the_pipeline_or_the_history():
    _, g = captured("llama")
    assert Pipeline(["adapter.dora", "adapter.fold", "adapter.unfold"]).run(g, probe=False).graph
    qat = Pipeline(["quantize.qat"]).run(g, probe=False).graph
    out = Pipeline(["quantize.convert"]).run(qat, probe=False).graph
    assert [h["pass"] for h in out.history] == ["quantize.qat", "quantize.convert"]


# ------------------------------------------------------------------ versions


def test_version_mismatch_is_refused_by_the_pipeline_and_load(tmp_path):
    _, g = captured("cnn")
    out = g.apply("quantize.rtn:bits=8")
    out.history = [{**out.history[0], "version": 7}]
    with pytest.raises(PassVersionError) as e:
        Pipeline(["quantize.rtn:bits=4,targets=embedding"]).run(out)
    assert _one_line(e) == ("quantize.rtn: recorded at version 7, but this splice has version 1 "
                            "(no migration; re-run the pass on the source model)")
    out.save(tmp_path / "art")
    with pytest.raises(PassVersionError, match="quantize.rtn: recorded at version 7"):
        splice.load(tmp_path / "art")


def test_recipe_replays_history_entries_at_their_version(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("passes:\n  - {pass: quantize.rtn, config: {bits: 3}, version: 1}\n")
    assert load_recipe(r)[0][1].bits == 3
    r.write_text("passes:\n  - {pass: quantize.rtn, config: {bits: 3}, version: 2}\n")
    with pytest.raises(PassVersionError) as e:
        load_recipe(r)
    assert "quantize.rtn: recorded at version 2, but this splice has version 1" in _one_line(e)


def test_a_pass_can_migrate_its_older_entries(register):
    def up(entry):
        return {**entry, "version": 2, "config": {}}

    register("test.v2", lambda g, c, x: PassResult(g, False), version=2, migrate=up)
    _, g = captured("cnn")
    g2 = g.copy()
    g2.history = [{"pass": "test.v2", "version": 1, "config": {"old": 1}}, {"pass": "train", "spec": "train"}]
    check_history(g2)
    assert g2.history[0] == {"pass": "test.v2", "version": 2, "config": {}} and g2.history[1]["pass"] == "train"


# ------------------------------------------------------------------ instruments


def test_a_user_instrument_sees_every_pass_and_entries_record_memory():
    _, g = captured("llama")
    seen = _Seen()
    result = Pipeline(["quantize.rtn:bits=8", "quantize.rtn:bits=4,targets=embedding"]).run(
        g, instruments=[seen], target="onnx")
    assert seen.calls == [("start", "onnx"), ("before", "quantize.rtn"), ("after", "quantize.rtn", True),
                          ("before", "quantize.rtn"), ("after", "quantize.rtn", True), ("end", 2)]
    for entry in result.reports:
        assert entry["peak_rss_bytes"] > 0 and entry["seconds"] >= 0 and entry["target"] == "onnx"
        assert entry["modified"] is True and "fidelity" in entry


def test_an_unmodified_graph_is_not_verified_or_probed_again(register, monkeypatch):
    import splice.passes.instruments as instruments

    register("test.nothing", lambda g, c, x: PassResult(g, False, {}))
    _, g = captured("cnn")
    calls = []
    real = instruments.compare_outputs
    monkeypatch.setattr(instruments, "compare_outputs", lambda *a: calls.append(1) or real(*a))
    result = Pipeline(["quantize.rtn:bits=8", "test.nothing"]).run(g)
    first, second = result.reports
    assert len(calls) == 1 and second["modified"] is False and second["fidelity"] == first["fidelity"]


# ------------------------------------------------------------------ other graphs, target


def test_a_missing_graph_is_refused_with_one_line(register):
    register("test.two", lambda g, c, x: PassResult(g, False), graphs=("other",))
    _, g = captured("cnn")
    with pytest.raises(ConfigError) as e:
        Pipeline(["quantize.rtn", "test.two"]).run(g)
    assert _one_line(e) == "test.two: needs graph 'other' (give --graph other=PATH / graphs={'other': g})"
    with pytest.raises(ConfigError) as e:
        Pipeline(["adapter.extract"]).run(g)
    assert _one_line(e).startswith("adapter.extract: option source is required")


def test_other_graphs_and_the_target_reach_the_pass(register):
    got = {}

    def two(graph, cfg, ctx):
        got.update(other=ctx.graphs["other"], target=ctx.target)
        return PassResult(graph, False)

    register("test.two", two, graphs=("other",))
    _, g = captured("cnn")
    _, other = captured("llama")
    out = Pipeline(["test.two"]).run(g, graphs={"other": other}, target="cpu").graph
    assert got == {"other": other, "target": "cpu"} and out.history[-1]["target"] == "cpu"


def test_extract_takes_its_source_as_a_graph():
    _, g = captured("llama")
    out = Pipeline(["adapter.extract:rank=2,targets=q_proj"]).run(g, graphs={"source": g}, probe=False)
    assert out.reports[-1]["report"]["rel_error_max"] == 0.0


# ------------------------------------------------------------------ shared analyses


def test_two_statistic_consumers_on_the_same_weights_gather_once(register):
    def stats(graph, cfg, ctx):  # an analysis that leaves the graph as it is
        input_hessians(graph, list(graph.nodes("linear")), ctx.calibration, ctx.cache)
        return PassResult(graph, False)

    register("test.stats", stats, needs_calibration=True)
    zm, g = captured("llama")
    calib = calibration(zm, g, n=3)
    cache = AnalysisCache()
    Pipeline(["test.stats", "quantize.allocate:avg_bits=4"]).run(g, calibration=calib, cache=cache, probe=False)
    assert cache.computed["input_stats"] == 1
    # another pipeline on the same graph with the same cache: GPTQ (not sequential, all samples) gathers nothing
    Pipeline(["quantize.gptq:sequential=false,holdout=0"]).run(g, calibration=calib, cache=cache, probe=False)
    assert cache.computed["input_stats"] == 1
    # statistics split for a held-out check are another analysis
    Pipeline(["quantize.gptq:sequential=false"]).run(g, calibration=calib, cache=cache, probe=False)
    assert cache.computed["input_stats"] == 2


def test_statistics_of_changed_weights_are_gathered_again_and_match_a_fresh_run():
    zm, g = captured("llama")
    calib = calibration(zm, g, n=3)
    cache = AnalysisCache()
    Pipeline(["quantize.gptq:sequential=false"]).run(g, calibration=calib, cache=cache, probe=False)
    changed = g.apply("quantize.rtn:bits=8,targets=embedding")  # every value downstream changes
    warm = Pipeline(["quantize.gptq:sequential=false"]).run(changed, calibration=calib, cache=cache, probe=False)
    assert cache.computed["input_stats"] == 2
    cold = Pipeline(["quantize.gptq:sequential=false"]).run(changed, calibration=calib, probe=False)
    a, b = warm.graph.tensors(), cold.graph.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fingerprints_follow_weights():
    _, g = captured("cnn")
    node = next(g.nodes("linear"))
    before = value_fingerprints(g)[node]
    copy = g.copy()
    assert value_fingerprints(copy)[next(copy.nodes("linear"))] == before  # same tensors, same value
    target = node.args[1].target
    set_attr(copy.gm, target, g.tensor(target).detach().clone())
    assert value_fingerprints(copy)[next(copy.nodes("linear"))] != before


# ------------------------------------------------------------------ declarations


def test_report_fields_and_applicability_are_declared():
    entry = captured("cnn")[1].apply("quantize.rtn:bits=8").history[-1]
    assert report_summary(entry)["layers quantized"] == entry["report"]["layers"]
    flora, rotate = base.get_pass("adapter.flora"), base.get_pass("quantize.rotate")
    assert flora.applies_to(captured("cnn")[1]) and not flora.applies_to(captured("llama")[1])
    assert rotate.applies_to(captured("llama")[1]) and not rotate.applies_to(captured("gpt2")[1])


# ------------------------------------------------------------------ Graph.apply, specs, recipes


def test_graph_apply_names_a_bad_argument():
    _, g = captured("cnn")
    with pytest.raises(ConfigError) as e:
        g.apply(42)
    assert _one_line(e) == "Graph.apply: expected pass specs like 'quantize.rtn:bits=4', got 42 (int)"


def test_a_duplicated_option_is_refused():
    with pytest.raises(ConfigError) as e:
        parse_spec("quantize.rtn:bits=4,bits=8")
    assert _one_line(e) == "quantize.rtn: option 'bits' is given twice"


def test_error_echo_of_user_input_is_capped():
    with pytest.raises(ConfigError) as e:
        parse_spec("quantize.rtn:bits=" + "9" * 100_000)
    assert "bits expects an integer" in _one_line(e)


def test_a_recipe_with_aliases_is_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a: &a ['x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x']"]
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(lines) + "\npasses: [*i]\n")
    with pytest.raises(SpliceError) as e:
        load_recipe(bomb)
    assert _one_line(e) == f"recipe {bomb}:1: YAML aliases and anchors are not allowed in a recipe"


def test_a_recipe_directory_is_refused(tmp_path):
    with pytest.raises(SpliceError) as e:
        load_recipe(tmp_path)
    assert _one_line(e) == f"recipe {tmp_path}: is a directory (give the YAML file)"
