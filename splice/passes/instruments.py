"""Pass instruments: code the Pipeline runs around every pass (as TVM's ``PassInstrument``).

An instrument overrides any of four hooks. ``before_pass`` hooks run in list order and
``after_pass`` hooks in reverse order, so instruments nest like context managers (the last one
listed sits closest to the pass: the default ``Timing`` times the pass alone). ``after_pass``
receives the pass's input graph, its ``PassResult`` and the history ``entry`` being built, to
which it may add keys. An instrument raises a ``SpliceError`` to stop the pipeline.

Built-ins (``default_instruments``): ``FidelityProbe`` (outputs on the example inputs against
the graph the pipeline started from), ``Verify`` (``ir/verify.py`` after every pass),
``MaskGuard`` (no pruned weight comes back, ``ir/sparsity.py``; always on),
``PeakMemory`` (peak resident memory during the pass) and ``Timing``. A pass that reports
``modified=False`` is neither verified nor probed again: its graph computes what it did before.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

from splice.errors import VerifyError
from splice.ir.metrics import compare_outputs
from splice.ir.sparsity import check_masks
from splice.ir.verify import output_signature, verify as verify_graph


class PassInstrument:
    """The interface; every hook does nothing by default."""

    def before_pipeline(self, graph, ctx) -> None:
        """Once, with the pipeline's input graph and its ``PassContext``."""

    def before_pass(self, graph, info, cfg) -> None:
        """Before pass ``info`` runs with ``cfg`` on ``graph``."""

    def after_pass(self, graph, info, cfg, result, entry: dict[str, Any]) -> None:
        """After the pass returned ``result`` (``result.graph`` is its output)."""

    def after_pipeline(self, graph, entries: list[dict[str, Any]]) -> None:
        """Once, with the final graph and every pass's history entry."""


def after(done: list[str]) -> str:
    """`` (after a, b)`` for error messages: the passes that ran before the failing one."""
    return f" (after {', '.join(done)})" if done else ""


class Verify(PassInstrument):
    """The graph verifies after every pass and keeps the input's output signature."""

    def before_pipeline(self, graph, ctx) -> None:
        self.signature, self.done = output_signature(graph), []

    def after_pass(self, graph, info, cfg, result, entry) -> None:
        if result.modified:
            try:
                verify_graph(result.graph, self.signature)
            except VerifyError as e:
                raise VerifyError(f"{info.name}: graph invalid after this pass{after(self.done)}: {e}") from e
        self.done.append(info.name)


class MaskGuard(PassInstrument):
    """After every pass, each pruned weight of the graph is still exactly zero (``check_masks``);
    otherwise the pipeline stops naming the pass and the first layer it revived."""

    def before_pipeline(self, graph, ctx) -> None:
        self.done = []

    def after_pass(self, graph, info, cfg, result, entry) -> None:
        if result.modified and result.graph.masks and (problems := check_masks(result.graph)):
            more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
            raise VerifyError(f"{info.name}: revives pruned weights{after(self.done)}: {problems[0]}{more}")
        self.done.append(info.name)


class FidelityProbe(PassInstrument):
    """``entry["fidelity"]``: max abs error, SQNR, cosine (and KL for logits) of each output on
    the example inputs against the pipeline's input graph."""

    def before_pipeline(self, graph, ctx) -> None:
        self.inputs = graph.example_inputs
        self.reference = graph.run(*self.inputs)
        self.last = None

    def after_pass(self, graph, info, cfg, result, entry) -> None:
        if result.modified or self.last is None:
            self.last = compare_outputs(self.reference, result.graph.run(*self.inputs))
        entry["fidelity"] = self.last


class Timing(PassInstrument):
    """``entry["seconds"]``: wall time of the pass."""

    def before_pass(self, graph, info, cfg) -> None:
        self.start = time.perf_counter()

    def after_pass(self, graph, info, cfg, result, entry) -> None:
        entry["seconds"] = round(time.perf_counter() - self.start, 3)


_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


class PeakMemory(PassInstrument):
    """``entry["peak_rss_bytes"]``: the process's peak resident memory while the pass ran
    (Linux resets the high-water mark before each pass; elsewhere it is the peak so far)."""

    def before_pass(self, graph, info, cfg) -> None:
        try:
            _CLEAR.write_text("5")  # reset VmHWM (proc(5): clear_refs)
        except OSError:
            pass

    def after_pass(self, graph, info, cfg, result, entry) -> None:
        entry["peak_rss_bytes"] = peak_rss_bytes()


def peak_rss_bytes() -> int:
    """VmHWM from ``/proc/self/status``, else ``getrusage``'s ``ru_maxrss``."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def default_instruments(*, verify: bool = True, probe: bool = True) -> list[PassInstrument]:
    """What ``Pipeline.run`` uses unless told otherwise (``verify=`` / ``probe=`` drop one)."""
    return [*([FidelityProbe()] if probe else []), *([Verify()] if verify else []), MaskGuard(), PeakMemory(), Timing()]
