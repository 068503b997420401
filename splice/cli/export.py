"""``splice export ARTIFACT --onnx FILE [--check]``: write a model for a runtime.

The target flags come from the export-target registry (:mod:`splice.runtime.targets`): one
flag per registered target. The file is staged beside its destination and moved into place
(``splice.ir.atomic.atomic_files``) only when the export and, with ``--check``, the parity check succeeded.
"""
from __future__ import annotations

import math
from pathlib import Path

from splice.cli.ui import UI, capture, check_output, esc, require_exists
from splice.errors import SpliceError, VerifyError

HELP = "export an artifact for a runtime (ONNX)"
DEFAULT_ATOL = 1e-4


def add_parser(sub, common) -> None:
    from splice.runtime.targets import export_targets

    targets = export_targets()
    p = sub.add_parser("export", parents=[common], help=HELP,
                       description="Export ARTIFACT (or any model splice can capture) for a runtime: "
                                   + ", ".join(t.flag for t in targets) + ". With --check the file is run at two "
                                   "batch sizes and two sequence lengths and compared with torch; it is written "
                                   "only if the check passes.")
    p.add_argument("artifact", metavar="ARTIFACT")
    where = p.add_mutually_exclusive_group(required=True)
    for t in targets:
        where.add_argument(t.flag, dest=t.name, metavar=t.metavar, help=t.help)
    p.add_argument("--check", action="store_true", help="check the runtime's outputs against torch")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"--check tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=run, targets=targets)


def check_inputs(graph, batches=(1, 3), seqs=(5, 17)) -> list[tuple[str, tuple]]:
    """(description, inputs) at every batch × sequence length the graph's dynamic axes allow."""
    has_batch = any(0 in axes for axes in graph.dynamic.values())
    has_seq = any(1 in axes for axes in graph.dynamic.values())
    seen, out = set(), []
    for b in batches:
        for s in seqs:
            inputs = graph.sample_inputs(b, s, seed=len(out))
            key = tuple(tuple(t.shape) for t in inputs)
            if key not in seen:
                seen.add(key)
                desc = " × ".join([f"batch {b}"] * has_batch + [f"seq {s}"] * has_seq) or "example shape"
                out.append((desc, inputs))
    return out


def _refuse_inside_input(dest: Path, source: str) -> None:
    """An export must not overwrite its own input (``--onnx ART/program.pt2 --force``)."""
    src, target = Path(source).resolve(), dest.resolve()
    if target == src or (src.is_dir() and src in target.parents):
        raise SpliceError(f"{dest}: inside the input {source}; write the export outside it")


def run(args, ui: UI) -> int:
    from splice.ir.atomic import atomic_dir, atomic_files

    target = next(t for t in args.targets if getattr(args, t.name) is not None)
    if args.check and target.check is None:
        raise SpliceError(f"export --check: no parity check for target {target.name}")
    dest = check_output(getattr(args, target.name), args.force)
    require_exists(args.artifact)
    _refuse_inside_input(dest, args.artifact)
    graph, _ = capture(args.artifact, ui)  # artifacts and .pt2 load; models are captured
    written: dict[str, int] = {}

    directory = target.metavar == "DIR"

    def write(tmp: Path) -> None:
        staged = tmp if directory else tmp / dest.name  # atomic_dir hands the directory itself
        with ui.phase(f"export {dest.name} ({target.name})"):
            target.export(graph, staged)
        if args.check:
            _check(args, ui, target, graph, staged, dest)
        written.update((p.name, p.stat().st_size) for p in (staged.iterdir() if directory else tmp.iterdir()))

    (atomic_dir if directory else atomic_files)(dest, args.force, write)
    companions = sorted(name for name in written if name != dest.name)
    ui.print(f"wrote {esc(dest)} ({sum(written.values()):,} bytes"
             f"{', with ' + esc(', '.join(companions)) if companions else ''})")
    return 0


def _check(args, ui: UI, target, graph, staged: Path, dest: Path) -> None:
    """Run the target's parity check; VerifyError (nothing written) above ``--atol``."""
    cases = check_inputs(graph)
    with ui.phase(f"check {target.name} against torch"):
        diff = target.check(graph, staged, [inputs for _, inputs in cases], args.debug)
    shapes = "; ".join(desc for desc, _ in cases)
    ui.print(f"parity: max |{target.name} - torch| = {diff:.3g} over {len(cases)} input shapes ({esc(shapes)})")
    if not math.isfinite(diff) or diff > args.atol:
        raise VerifyError(f"{dest}: {target.name} differs from torch by {diff:.3g} (> --atol {args.atol:g}); "
                          "file not written")
