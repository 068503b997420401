"""The Pipeline: check every step's declared needs, then run the passes with instruments.

Before running anything ``Pipeline.run`` checks the input graph's history (``check_history``:
pass versions), that each step's ``requires`` come earlier in the pipeline or in the history,
that calibration data is there for passes that need it (and enough of it: ``ir.calibration.check_size``;
its record goes into each calibrated pass's history entry), and that every graph a pass declares
(``graphs=``) is given: in ``graphs={name: Graph}``, or named by the pass's option of the same
name (``adapter.extract:source=DIR``), which the layer above resolves with its ``load_graph``
(the API and CLI plug in the frontends' capture; the passes layer imports no frontend).
The graph named ``original`` is the pipeline's input unless given: a pass that compensates what
earlier passes of the same pipeline lost (``lowrank.eora``) reads the weights from before them there.
Around each pass it runs the instruments (``instruments.py``: fidelity probe, verify, peak
memory, timing by default, and any the caller adds), marks nodes the pass created with
``meta["splice_pass"]`` and appends a history entry (pass, spec, config, version, modified,
target, report and what the instruments add). A failure names the pass and the passes before it.

Importing this module plugs the Pipeline into ``Graph.apply`` (``ir.graph.set_apply``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from splice.errors import ConfigError, SpliceError
from splice.ir import graph as ir_graph
from splice.ir.calibration import calibration_record, check_size
from splice.ir.graph import Graph
from splice.passes.analysis import AnalysisCache
from splice.passes.base import PassConfig, PassContext, PassInfo, PassResult, check_history, get_pass, providers
from splice.passes.instruments import PassInstrument, after, default_instruments
from splice.passes.spec import format_spec, load_recipe, parse_spec
from splice.progress import phase

GraphLoader = Callable[[str], Graph]
ORIGINAL = "original"  # ctx.graphs[ORIGINAL]: the pipeline's input graph (lowrank.eora reads the float weights there)
_LOADER: list[GraphLoader] = []


class PassError(SpliceError):
    """A pass raised an unexpected error (a bug or an unsupported model)."""


@dataclass
class PipelineResult:
    graph: Graph
    reports: list[dict[str, Any]] = field(default_factory=list)


def set_graph_loader(load: GraphLoader) -> None:
    """The default ``load_graph`` of ``Pipeline.run`` (path -> Graph): set by the API."""
    _LOADER[:] = [load]


def run_pass(graph: Graph, info: PassInfo, cfg: PassConfig, ctx: PassContext | None = None) -> PassResult:
    """Run one pass on a private copy of ``graph`` and mark the nodes it created."""
    if info.calibrated(cfg) and (ctx is None or not ctx.calibration):
        raise ConfigError(f"{info.name}: needs calibration data; pass --calib FILE (calibration=...)")
    ctx = ctx or PassContext()
    for name in info.graphs:
        if name not in ctx.graphs:
            raise ConfigError(_missing_graph(info, name))
    for name in info.datasets:
        if not ctx.datasets.get(name):
            raise ConfigError(_missing_dataset(info, name))
    work = graph.copy()
    before = {n.name for n in work.gm.graph.nodes}
    result = info.fn(work, cfg, ctx)
    out = result.graph.finalize()
    for node in out.gm.graph.nodes:
        if node.name not in before and "splice_pass" not in node.meta:
            node.meta["splice_pass"] = info.name
            node.meta.setdefault("custom", {})["splice_pass"] = info.name
    return PassResult(out, result.modified, result.report)


class Pipeline:
    """An ordered list of (pass, config); prints as and parses from spec strings."""

    def __init__(self, steps: Sequence[tuple[PassInfo, PassConfig] | str]):
        self.steps = [parse_spec(s) if isinstance(s, str) else s for s in steps]

    @classmethod
    def parse(cls, specs: Sequence[str]) -> "Pipeline":
        return cls(list(specs))

    @classmethod
    def from_recipe(cls, path: str | Path) -> "Pipeline":
        return cls(load_recipe(path))

    def specs(self) -> list[str]:
        return [format_spec(info, cfg) for info, cfg in self.steps]

    def __str__(self) -> str:
        return " -> ".join(self.specs()) or "(empty pipeline)"

    def check(self, graph: Graph, *, calibration=None, datasets=None) -> None:
        """Refuse the pipeline before it runs: pass versions in the history, ``requires``, calibration."""
        check_history(graph)
        have = set()
        for entry in graph.history:
            name = entry.get("pass") if isinstance(entry, dict) else None
            have |= _gives(name)
        for info, cfg in self.steps:
            for need in info.requires:
                if need not in have:
                    raise ConfigError(f"{info.name}: requires {_describe_need(need)} earlier in the pipeline "
                                      "or in the graph's history")
            if info.calibrated(cfg) and not calibration:
                raise ConfigError(f"{info.name}: needs calibration data; pass --calib FILE (calibration=...)")
            for name in info.datasets:
                if not (datasets or {}).get(name):
                    raise ConfigError(_missing_dataset(info, name))
            have |= {info.name, *info.provides}
        calibrated = [info.name for info, cfg in self.steps if info.calibrated(cfg)]
        if calibrated:
            check_size(graph, calibration, calibrated[0])

    def run(self, graph: Graph, *, calibration=None, verify: bool = True, probe: bool = True,
            progress: bool = False, seed: int = 0, graphs: dict[str, Graph] | None = None,
            target: str | None = None, cache: AnalysisCache | None = None,
            instruments: Sequence[PassInstrument] = (), load_graph: GraphLoader | None = None,
            datasets: dict[str, list] | None = None) -> PipelineResult:
        """Run every step on ``graph``. ``graphs``: other graphs by name for passes that read one;
        ``datasets``: further calibration sets by name for passes that read one;
        ``target``: what the result is compiled for (recorded); ``cache``: share analyses with
        other runs; ``instruments``: added after the defaults (``verify``/``probe`` drop those)."""
        self.check(graph, calibration=calibration, datasets=datasets)
        given = {ORIGINAL: graph, **(graphs or {})}  # the pipeline's input, unless the caller names another
        step_graphs = self._resolve_graphs(given, load_graph or (_LOADER[0] if _LOADER else None))
        ctx = PassContext(calibration=calibration, seed=seed, progress=progress, target=target,
                          cache=AnalysisCache() if cache is None else cache, datasets=dict(datasets or {}))
        record = calibration_record(graph, calibration) if calibration else None
        used = [*default_instruments(verify=verify, probe=probe), *instruments]
        for inst in used:
            inst.before_pipeline(graph, ctx)
        start, reports, done = graph, [], []
        for i, ((info, cfg), named) in enumerate(zip(self.steps, step_graphs), 1):
            for inst in used:
                inst.before_pass(graph, info, cfg)
            with phase(f"pass {i}/{len(self.steps)} {format_spec(info, cfg)}", show=progress):
                result = self._guarded(graph, info, cfg, dataclasses.replace(ctx, graphs=named), done)
            entry = {"pass": info.name, "spec": format_spec(info, cfg), "config": cfg.to_dict(),
                     "version": info.version, "modified": result.modified, "report": result.report}
            if info.calibrated(cfg):
                entry["calibration"] = record
            for name in info.datasets:
                entry.setdefault("datasets", {})[name] = calibration_record(graph, datasets[name])
            if target is not None:
                entry["target"] = target
            with phase(f"check pass {i} ({', '.join(type(inst).__name__ for inst in used)})", show=progress):
                for inst in reversed(used):
                    inst.after_pass(graph, info, cfg, result, entry)
            if ctx.cache.entries:
                ctx.cache.retain(start, result.graph)
            graph = result.graph
            graph.history = graph.history + [entry]
            reports.append(entry)
            done.append(info.name)
        for inst in used:
            inst.after_pipeline(graph, reports)
        return PipelineResult(graph, reports)

    def _resolve_graphs(self, given: dict[str, Graph], load: GraphLoader | None) -> list[dict[str, Graph]]:
        """Each step's ``ctx.graphs``: ``given``, plus graphs its options name by path."""
        out = []
        for info, cfg in self.steps:
            named = dict(given)
            for name in info.graphs:
                path = getattr(cfg, name, None) if info.graph_option(name) is not None else None
                if path:
                    named[name] = _load(info, name, str(path), load)
                elif name not in named:
                    raise ConfigError(_missing_graph(info, name))
            out.append(named)
        return out

    @staticmethod
    def _guarded(graph, info, cfg, ctx, done) -> PassResult:
        try:
            return run_pass(graph, info, cfg, ctx)
        except SpliceError as e:
            if not done:
                raise
            raise type(e)(f"{e}{after(done)}") from e
        except Exception as e:
            raise PassError(f"{info.name}: failed{after(done)}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e


def apply(graph: Graph, *specs: str, calibration=None, verify: bool = True, datasets=None) -> Graph:
    """``Graph.apply``: run passes given as spec strings; returns the new Graph."""
    bad = [s for s in specs if not isinstance(s, str)]
    if bad:
        raise ConfigError(f"Graph.apply: expected pass specs like 'quantize.rtn:bits=4', got {_short(bad[0])} "
                          f"({type(bad[0]).__name__})")
    return Pipeline.parse(list(specs)).run(graph, calibration=calibration, verify=verify, datasets=datasets).graph


ir_graph.set_apply(apply)


def _gives(name: Any) -> set[str]:
    """What a history entry of pass ``name`` satisfies: its name and what the pass provides."""
    if not isinstance(name, str):
        return set()
    try:
        return {name, *get_pass(name).provides}
    except ConfigError:  # a pass this process does not know (e.g. ``train``, a user pass)
        return {name}


def _describe_need(need: str) -> str:
    names = providers(need)
    if names == [need]:
        return need
    listed = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    return f"{need} (a pass providing it: {listed})" if names else need


def _missing_dataset(info: PassInfo, name: str) -> str:
    return (f"{info.name}: needs the calibration set '{name}' (--calib-set {name}=SOURCE, "
            f"datasets={{'{name}': samples}})")


def _missing_graph(info: PassInfo, name: str) -> str:
    option = info.graph_option(name)
    if option is not None:
        return f"{info.name}: option {name} is required ({option}), or give graphs={{'{name}': g}}"
    return f"{info.name}: needs graph '{name}' (give --graph {name}=PATH / graphs={{'{name}': g}})"


def _load(info: PassInfo, name: str, path: str, load: GraphLoader | None) -> Graph:
    if not Path(path).exists():
        raise ConfigError(f"{info.name}: {name} '{path}': no such file or directory")
    if load is None:
        raise ConfigError(f"{info.name}: {name} '{path}': no model loader here; load it and give "
                          f"graphs={{'{name}': g}}")
    try:
        return load(path)
    except SpliceError as e:
        raise ConfigError(f"{info.name}: {name} '{path}': {e}") from None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
