"""The Pipeline: run passes in order with instruments around each one.

After every pass it verifies the graph (``ir/verify.py``), probes fidelity against the
graph the pipeline started from (max abs error, SQNR, cosine, KL for logits, on the
example inputs), marks nodes the pass created with ``meta["splice_pass"]``, times the pass
and appends a history entry (pass, config, version, report, seconds, fidelity). A failure
names the pass and the passes that ran before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from splice.errors import ConfigError, SpliceError, VerifyError
from splice.eval.metrics import compare_outputs
from splice.ir.graph import Graph
from splice.ir.verify import output_signature, verify as verify_graph
from splice.passes.base import PassConfig, PassContext, PassInfo, PassResult
from splice.passes.spec import format_spec, load_recipe, parse_spec


class PassError(SpliceError):
    """A pass raised an unexpected error (a bug or an unsupported model)."""


@dataclass
class PipelineResult:
    graph: Graph
    reports: list[dict[str, Any]] = field(default_factory=list)


def run_pass(graph: Graph, info: PassInfo, cfg: PassConfig, ctx: PassContext | None = None) -> PassResult:
    """Run one pass on a private copy of ``graph`` and mark the nodes it created."""
    if info.needs_calibration and (ctx is None or not ctx.calibration):
        raise ConfigError(f"{info.name}: needs calibration data; pass --calib FILE (calibration=...)")
    work = graph.copy()
    before = {n.name for n in work.gm.graph.nodes}
    result = info.fn(work, cfg, ctx or PassContext())
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

    def run(self, graph: Graph, *, calibration=None, verify: bool = True, probe: bool = True,
            progress: bool = False, seed: int = 0) -> PipelineResult:
        for info, _ in self.steps:
            if info.needs_calibration and not calibration:
                raise ConfigError(f"{info.name}: needs calibration data; pass --calib FILE (calibration=...)")
        ctx = PassContext(calibration=calibration, seed=seed, progress=progress)
        reference = graph.run(*graph.example_inputs) if probe else None
        signature = output_signature(graph) if verify else None
        reports = []
        done: list[str] = []
        for info, cfg in tqdm(self.steps, desc="passes", disable=not progress or len(self.steps) < 2):
            start = time.perf_counter()
            result = self._guarded(graph, info, cfg, ctx, done)
            seconds = time.perf_counter() - start
            if verify:
                try:
                    verify_graph(result.graph, signature)
                except VerifyError as e:
                    raise VerifyError(f"{info.name}: graph invalid after this pass{_after(done)}: {e}") from e
            entry = {"pass": info.name, "spec": format_spec(info, cfg), "config": cfg.to_dict(),
                     "version": info.version, "seconds": round(seconds, 3), "report": result.report}
            if reference is not None:
                entry["fidelity"] = compare_outputs(reference, result.graph.run(*graph.example_inputs))
            graph = result.graph
            graph.history = graph.history + [entry]
            reports.append(entry)
            done.append(info.name)
        return PipelineResult(graph, reports)

    @staticmethod
    def _guarded(graph, info, cfg, ctx, done) -> PassResult:
        try:
            return run_pass(graph, info, cfg, ctx)
        except SpliceError as e:
            if not done:
                raise
            raise type(e)(f"{e}{_after(done)}") from e
        except Exception as e:
            raise PassError(f"{info.name}: failed{_after(done)}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _after(done: list[str]) -> str:
    return f" (after {', '.join(done)})" if done else ""
