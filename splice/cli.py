"""The ``splice`` command.

    splice passes [NAME]                          list passes, or one pass's options
    splice inspect MODEL|ARTIFACT                 layers, sizes, op counts, pass history
    splice run MODEL -p SPEC [-p SPEC ...] [--recipe FILE] [--calib FILE] -o OUT [--force]
    splice export ARTIFACT --onnx FILE [--check] [--force]
    splice eval MODEL|ARTIFACT --ppl FILE [--seq-len N] [--stride N] [--max-tokens N] [--ref MODEL [--layers]]
    splice train MODEL|ARTIFACT --data FILE [--eval FILE] [-p SPEC ...] --steps N --lr LR -o OUT [--resume]
    splice demo ...                               the end-to-end demo (splice/demo.py)

Bad input (a :class:`~splice.errors.SpliceError`) prints one line ``splice: error: ...`` on
stderr and exits 1 (argparse usage errors exit 2); ``--debug`` re-raises with the traceback.
Every check that needs no model (pass specs, recipe, calibration file, output path) runs
before the model is captured, and outputs are only written once everything succeeded.
Library chatter (torch's export dumps, transformers' progress bars, warnings) is silenced
unless ``--debug``; progress spinners appear only on a terminal.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from splice.errors import ConfigError, SpliceError, VerifyError
from splice.quiet import quiet

PROG = "splice"
DEFAULT_ATOL = 1e-4


class UsageError(SpliceError):
    """A command line that is well-formed for argparse but still unusable (exit 2)."""


# ------------------------------------------------------------------------ output helpers


class _UI:
    """Where output goes: results on stdout, spinners on the terminal's stderr."""

    def __init__(self, debug: bool):
        from rich.console import Console

        self.debug = debug
        wide = None if sys.stdout.isatty() else 200  # pipes and captures get unwrapped tables
        self.out = Console(file=sys.stdout, width=wide, highlight=False)
        self.err = Console(file=sys.stderr, stderr=True, highlight=False)

    def status(self, text: str):
        """A transient spinner on a terminal; nothing otherwise (no stray stderr lines)."""
        if self.err.is_terminal:
            return self.err.status(text, spinner="dots")
        return contextlib.nullcontext()

    def print(self, *args, **kw) -> None:
        self.out.print(*args, **kw)

    @property
    def interactive(self) -> bool:
        return self.err.is_terminal

    @contextlib.contextmanager
    def quiet(self, redirect: bool = True):
        """Silence library output (and, with ``redirect``, anything printed to stderr)."""
        if self.debug:
            yield
            return
        with quiet(stderr=redirect):
            yield


def _esc(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))


def _fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_num(v: Any, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _fmt_type(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def _spec_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _one_line(msg: Any) -> str:
    return " ".join(part.strip() for part in str(msg).splitlines() if part.strip()) or "(no message)"


# ------------------------------------------------------------------------------ passes


def cmd_passes(args, ui: _UI) -> int:
    from splice.passes.base import get_pass, list_passes

    if not args.name:
        infos = list_passes()
        width = max((len(i.name) for i in infos), default=0)
        for info in infos:
            calib = "  [needs calibration]" if info.needs_calibration else ""
            print(f"{info.name:<{width}}  {info.summary}{calib}  {info.reference}".rstrip())
        return 0
    info = get_pass(args.name)
    from rich.table import Table

    ui.print(f"[bold]{_esc(info.name)}[/bold]  {_esc(info.summary)}")
    ui.print(f"reference: {_esc(info.reference)}")
    ui.print(f"version: {info.version}    needs calibration: {'yes (--calib FILE)' if info.needs_calibration else 'no'}")
    fields = info.config_cls.options()
    if not fields:
        ui.print("options: none")
        return 0
    types_ = info.config_cls.option_types()
    helps = {f.name: f.metadata.get("help", "") for f in fields}
    table = Table(title=None, show_edge=False)
    table.add_column("option")
    table.add_column("type")
    table.add_column("default")
    if any(helps.values()):
        table.add_column("help")
    for f in fields:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        row = [_esc(f.name), _esc(_fmt_type(types_.get(f.name, f.type))), _esc(repr(default) if isinstance(default, str) else default)]
        if any(helps.values()):
            row.append(_esc(helps[f.name]))
        table.add_row(*row)
    ui.print(table)
    example = ",".join(f"{f.name}={_spec_value(f.default)}" for f in fields[:2]
                       if f.default is not dataclasses.MISSING)
    ui.print(f"example: splice run MODEL -p {_esc(info.name)}{':' + _esc(example) if example else ''} -o OUT")
    return 0


# ----------------------------------------------------------------------------- inspect


def _capture(path: str, ui: _UI):
    import splice

    with ui.status(f"capturing {path} with torch.export…"), ui.quiet():
        start = time.perf_counter()
        graph = splice.capture(path)
    return graph, time.perf_counter() - start


def _first_fidelity(entry: dict, output: str | None) -> dict:
    fid = entry.get("fidelity") or {}
    if not fid:
        return {}
    if output in fid:
        return fid[output]
    return next(iter(fid.values()))


def _plan_table(entry: dict):
    """Per-layer bit widths chosen by a mixed-precision pass (its report's ``plan``)."""
    from rich.table import Table

    rep = entry["report"]
    table = Table(title=f"{entry.get('pass')} plan: mean {rep.get('avg_bits', '?')} bits", title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("bits", justify="right")
    for path, bits in rep["plan"].items():
        table.add_row(_esc(path), str(bits))
    return table


def _history_table(history: list[dict], output: str | None, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("#", "right"), ("pass", "left"), ("seconds", "right"), ("sqnr dB", "right"),
                      ("cosine", "right"), ("kl", "right"), ("weights before → after", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for i, entry in enumerate(history, 1):
        fid = _first_fidelity(entry, output)
        rep = entry.get("report") or {}
        before = rep.get("weight_bytes_before", rep.get("bytes_before"))
        after = rep.get("weight_bytes_after", rep.get("bytes_after"))
        sizes = f"{_fmt_bytes(before)} → {_fmt_bytes(after)}" if before is not None and after is not None else "—"
        table.add_row(str(i), _esc(entry.get("spec", entry.get("pass", "?"))),
                      _fmt_num(entry.get("seconds"), ".2f"), _fmt_num(fid.get("sqnr_db"), ".2f"),
                      _fmt_num(fid.get("cosine"), ".5f"), _fmt_num(fid.get("kl"), ".2e"), sizes)
    return table


def cmd_inspect(args, ui: _UI) -> int:
    from rich.table import Table

    graph, seconds = _capture(args.model, ui)
    src = graph.source
    kind = "artifact" if _is_artifact(args.model) else src.get("kind", "?")  # artifacts keep their source
    if kind == "artifact" and src.get("kind"):
        kind = f"artifact of {src['kind']}"
    ui.print(f"[bold]{_esc(src.get('name', args.model))}[/bold]  ({_esc(kind)}"
             + (f", {_esc(src['model_type'])}" if src.get("model_type") else "") + f"; loaded in {seconds:.1f} s)")
    ui.print(f"inputs: {_esc(', '.join(_input_desc(graph)))}    outputs: {_esc(', '.join(graph.output_names))}")

    layers = graph.layers()
    table = Table(title=f"layers ({len(layers)})", title_justify="left")
    for col, just in (("path", "left"), ("op", "left"), ("kind", "left"), ("weight shape", "left"), ("bytes", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for row in layers:
        shape = "×".join(map(str, row["shape"])) if row["shape"] else "—"
        table.add_row(_esc(row["path"] or "(top)"), _esc(row["op"]), _esc(row["kind"]), shape, f"{row['bytes']:,}")
    ui.print(table)

    by_role = graph.bytes_by_role()
    total = sum(by_role.values())
    sizes = Table(title="stored bytes by role", title_justify="left")
    sizes.add_column("role")
    sizes.add_column("bytes", justify="right")
    sizes.add_column("share", justify="right")
    for role, n in sorted(by_role.items(), key=lambda kv: -kv[1]):
        sizes.add_row(_esc(role), f"{n:,}", f"{100 * n / total:.1f}%" if total else "—")
    sizes.add_row("[bold]total[/bold]", f"[bold]{total:,}[/bold]", f"({_fmt_bytes(total)})")
    ui.print(sizes)

    counts = graph.op_counts()
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = top[:args.top_ops]
    ops = ", ".join(f"{_esc(op)} ×{n}" for op, n in shown)
    rest = len(top) - len(shown)
    ui.print(f"ops: {sum(counts.values()):,} calls of {len(counts)} op types: {ops}"
             + (f", … {rest} more types" if rest > 0 else ""))
    ui.print(f"params: {graph.num_params():,}    bytes: {total:,} ({_fmt_bytes(total)})")
    if graph.history:
        out = graph.output_names[0] if graph.output_names else None
        ui.print(_history_table(graph.history, out, f"pass history (fidelity of '{out}' vs the captured model)"))
    elif _is_artifact(args.model):
        ui.print("pass history: none")
    return 0


def _input_desc(graph) -> list[str]:
    out = []
    for name, ex in zip(graph.input_names, graph.example_inputs):
        axes = graph.dynamic.get(name, {})
        dims = [axes.get(i, str(d)) for i, d in enumerate(getattr(ex, "shape", ()))]
        out.append(f"{name}[{', '.join(map(str, dims))}]")
    return out


# --------------------------------------------------------------------------------- run


def _refuse_existing(path: Path, force: bool) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        raise SpliceError(f"{path}: already exists; use --force to overwrite")


def cmd_run(args, ui: _UI) -> int:
    from splice.passes.manager import Pipeline
    from splice.passes.spec import load_recipe, parse_spec

    # 1. everything that needs no model: pass specs, recipe, calibration file, output path
    steps = []
    if args.recipe:
        steps += load_recipe(args.recipe)
    for spec in args.passes or []:
        steps.append(parse_spec(spec))
    if not steps and not args.peft:
        raise UsageError("run: no passes given; use -p PASS[:key=value,...] or --recipe FILE (see `splice passes`)")
    pipeline = Pipeline(steps)
    for peft_dir in args.peft or []:
        if not (Path(peft_dir) / "adapter_config.json").is_file():
            raise SpliceError(f"--peft {peft_dir}: not a PEFT adapter directory (no adapter_config.json)")
    needs = [info.name for info, _ in steps if info.needs_calibration]
    if needs and not args.calib:
        raise ConfigError(f"{needs[0]}: needs calibration data; pass --calib TEXTFILE")
    text = None
    if args.calib:
        from splice.eval.data import read_text, text_calibration

        text = read_text(args.calib)
    out = Path(args.output)
    _refuse_existing(out, args.force)
    model_path = Path(args.model)
    if not model_path.exists():
        raise SpliceError(f"{model_path}: no such file or directory")

    # 2. capture, calibrate, run, save
    graph, cap_s = _capture(args.model, ui)
    ui.print(f"captured {_esc(graph.source.get('name', args.model))}: {graph.num_params():,} params, "
             f"{len(graph.layers())} layers in {cap_s:.1f} s")
    for peft_dir in args.peft or []:
        import splice

        with ui.status(f"loading PEFT adapter {peft_dir}…"), ui.quiet():
            name = "default" if len(args.peft) == 1 else Path(peft_dir).resolve().name
            graph = splice.load_peft(graph, peft_dir, name=name)
        ui.print(f"attached PEFT adapter {_esc(peft_dir)}")
    calibration = None
    if needs:
        with ui.status("tokenizing calibration text…"), ui.quiet():
            calibration = text_calibration(graph, text, args.calib_samples, args.calib_seqlen)
        ui.print(f"calibration: {len(calibration)} samples × {args.calib_seqlen} tokens from {_esc(args.calib)}")
    elif text is not None:
        ui.print(f"note: --calib ignored, no pass in {_esc(str(pipeline))} needs calibration")
    before = graph.nbytes()
    if ui.interactive:  # the pipeline's own progress bars (tqdm, on stderr)
        ui.err.print(f"running {_esc(str(pipeline))}")
        with ui.quiet(redirect=False):
            result = pipeline.run(graph, calibration=calibration, progress=True)
    else:
        with ui.quiet():
            result = pipeline.run(graph, calibration=calibration, progress=False)
    with ui.status(f"saving {out}…"), ui.quiet():
        result.graph.save(out, force=args.force)

    # 3. summary
    new = result.graph
    output = new.output_names[0] if new.output_names else None
    ui.print(_history_table(result.reports, output, f"passes (fidelity of '{output}' vs the captured model)"))
    for entry in result.reports:  # mixed-precision passes report their per-layer plan
        if "plan" in (entry.get("report") or {}):
            ui.print(_plan_table(entry))
    after = new.nbytes()
    ratio = f" ({before / after:.2f}× smaller)" if after and after < before else ""
    ui.print(f"model bytes: {before:,} → {after:,}{ratio}")
    ui.print(f"saved artifact: {_esc(out)}")
    return 0


# ------------------------------------------------------------------------------ export


def _check_inputs(graph, batches=(1, 3), seqs=(5, 17)) -> list[tuple[str, tuple]]:
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


def cmd_export(args, ui: _UI) -> int:
    import splice
    from splice.runtime.onnx import export_onnx, onnx_bytes, parity

    dest = Path(args.onnx)
    _refuse_existing(dest, args.force)
    data = dest.with_name(dest.name + ".data")
    if not Path(args.artifact).exists():
        raise SpliceError(f"{args.artifact}: no such file or directory")
    with ui.status(f"loading {args.artifact}…"), ui.quiet():
        graph = splice.capture(args.artifact)  # artifacts and .pt2 load; models are captured
    created = [p for p in reversed(dest.parents) if not p.exists()]  # removed again on failure
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    ok = False
    try:
        staged = tmp / dest.name
        with ui.status(f"exporting {dest.name} to ONNX…"), ui.quiet():
            export_onnx(graph, staged, force=True)
        size = onnx_bytes(staged)
        if args.check:
            cases = _check_inputs(graph)
            if not args.debug:
                _quiet_ort()
            with ui.status("checking ONNX Runtime against torch…"), ui.quiet():
                diff = parity(graph, staged, [inputs for _, inputs in cases])
            shapes = "; ".join(desc for desc, _ in cases)
            ui.print(f"parity: max |onnxruntime - torch| = {diff:.3g} over {len(cases)} input shapes ({_esc(shapes)})")
            if not math.isfinite(diff) or diff > args.atol:
                raise VerifyError(f"{dest}: ONNX Runtime differs from torch by {diff:.3g} (> --atol {args.atol:g}); "
                                  "file not written")
        if (tmp / data.name).exists():
            os.replace(tmp / data.name, data)
        os.replace(staged, dest)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created) if not ok else ():
            with contextlib.suppress(OSError):
                p.rmdir()
    ui.print(f"wrote {_esc(dest)} ({size:,} bytes{', weights in ' + _esc(data.name) if data.exists() else ''})")
    return 0


def _is_artifact(path: str) -> bool:
    from splice.ir.artifact import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def _quiet_ort() -> None:
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except Exception:  # pragma: no cover - logging only
        pass


# -------------------------------------------------------------------------------- eval


def _ppl_line(label: str, r: dict, seconds: float) -> str:
    return (f"{label}perplexity {r['ppl']:.4f}  (nll {r['nll']:.4f} nats/token over {r['tokens']:,} tokens; "
            f"{r['windows']} windows of {r['seq_len']}, stride {r['stride']}; {seconds:.1f} s)")


def cmd_eval(args, ui: _UI) -> int:
    from splice.eval.data import read_text
    from splice.eval.perplexity import check_logits, layer_sqnr, perplexity, tokenize

    # 1. everything that needs no model
    stride = args.stride or args.seq_len
    if stride > args.seq_len:
        raise UsageError(f"eval: --stride {stride} is larger than --seq-len {args.seq_len} (tokens would be skipped)")
    if args.layers and not args.ref:
        raise UsageError("eval: --layers compares against a reference model; add --ref MODEL")
    text = read_text(args.ppl)
    for path in [args.model] + ([args.ref] if args.ref else []):
        if not Path(path).exists():
            raise SpliceError(f"{path}: no such file or directory")

    # 2. load, tokenize (the evaluated model's tokenizer), evaluate
    graph, cap_s = _capture(args.model, ui)
    check_logits(graph)
    ref = None
    if args.ref:
        ref, _ = _capture(args.ref, ui)
        check_logits(ref)
    with ui.status("tokenizing…"), ui.quiet():
        ids = tokenize(graph, text)
    if args.max_tokens:
        ids = ids[:, :args.max_tokens]
    if ids.shape[1] < args.seq_len:
        raise SpliceError(f"{args.ppl}: text too short: {ids.shape[1]:,} tokens, need at least {args.seq_len} for "
                          f"one window (--seq-len {args.seq_len})" + (f" after --max-tokens {args.max_tokens}"
                                                                      if args.max_tokens else ""))
    ui.print(f"[bold]{_esc(graph.source.get('name', args.model))}[/bold]  (loaded in {cap_s:.1f} s; "
             f"{_esc(args.ppl)}: {ids.shape[1]:,} tokens)")
    results = []
    for label, g in [("", graph)] + ([("reference ", ref)] if ref is not None else []):
        start = time.perf_counter()
        with ui.quiet(redirect=not ui.interactive):
            r = perplexity(g, ids, seq_len=args.seq_len, stride=stride, progress=ui.interactive)
        ui.print(_ppl_line(label, r, time.perf_counter() - start))
        results.append(r)
    if ref is not None:
        d = results[0]["ppl"] - results[1]["ppl"]
        ui.print(f"vs reference: {d:+.4f} ({100 * d / results[1]['ppl']:+.2f}%)")
    if args.layers:
        from rich.table import Table

        n = min(args.layer_samples, ids.shape[1] // args.seq_len)
        samples = [ids[:, i * args.seq_len:(i + 1) * args.seq_len] for i in range(n)]
        with ui.status("comparing layers…"), ui.quiet():
            rows = layer_sqnr(ref, graph, [{"input_ids": s} for s in samples])
        table = Table(title=f"per-layer output SQNR vs {_esc(args.ref)} ({n} × {args.seq_len} tokens)",
                      title_justify="left")
        for col, just in (("layer", "left"), ("op", "left"), ("sqnr dB", "right"), ("cosine", "right"),
                          ("max abs", "right")):
            table.add_column(col, justify=just, overflow="fold")
        for row in rows:
            table.add_row(_esc(row["path"]), _esc(row["op_test"]), _fmt_num(row["sqnr_db"], ".2f"),
                          _fmt_num(row["cosine"], ".5f"), _fmt_num(row["max_abs"], ".3g"))
        ui.print(table)
        finite = [r["sqnr_db"] for r in rows if math.isfinite(r["sqnr_db"])]
        if finite:
            worst = min(rows, key=lambda r: r["sqnr_db"])
            ui.print(f"worst layer: {_esc(worst['path'])} at {worst['sqnr_db']:.2f} dB; "
                     f"mean {sum(finite) / len(finite):.2f} dB over {len(finite)} changed layers")
    return 0


# ------------------------------------------------------------------------------- train


def cmd_train(args, ui: _UI) -> int:
    import splice
    from splice.eval.data import read_text
    from splice.passes.manager import Pipeline
    from splice.passes.spec import parse_spec
    from splice.train import TrainConfig

    # 1. everything that needs no model: options, pass specs, data files, output path
    opts = dict(loss=args.loss, steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                seq_len=args.seq_len, warmup=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay,
                max_grad_norm=args.max_grad_norm, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                seed=args.seed)
    TrainConfig(**opts)
    if args.resume and not args.checkpoint_dir:
        raise UsageError("train: --resume needs --checkpoint-dir DIR")
    pipeline = Pipeline([parse_spec(spec) for spec in args.passes or []])
    for path in [args.data] + ([args.eval] if args.eval else []):
        read_text(path)
    out = Path(args.output)
    _refuse_existing(out, args.force)
    if not Path(args.model).exists():
        raise SpliceError(f"{args.model}: no such file or directory")

    # 2. capture, add adapters, train, save
    graph, cap_s = _capture(args.model, ui)
    ui.print(f"captured {_esc(graph.source.get('name', args.model))}: {graph.num_params():,} params in {cap_s:.1f} s")
    if pipeline.steps:
        with ui.status(f"running {pipeline}…"), ui.quiet():
            graph = pipeline.run(graph).graph
        ui.print(f"passes: {_esc(str(pipeline))}")
    with ui.quiet(redirect=not ui.interactive):
        trained, report = splice.train(graph, args.data, eval_data=args.eval, checkpoint_dir=args.checkpoint_dir,
                                       resume=args.resume, progress=ui.interactive, **opts)
    with ui.status(f"saving {out}…"), ui.quiet():
        trained.save(out, force=args.force)

    # 3. summary
    ui.print(f"trained {report['trainable_params']:,} parameters ({report['trainable_tensors']} tensors) for "
             f"{report['steps']} steps on {report['examples']:,} examples of {_esc(args.data)} "
             f"({report['seconds_per_step']} s/step)")
    ui.print(f"train loss: {report['train_loss_first']:.4f} (first steps) → {report['train_loss_last']:.4f} (last steps)")
    if report["eval_loss_after"] is not None:
        before = report["eval_loss_before"]
        ui.print(f"held-out loss ({_esc(args.eval)}): "
                 + (f"{before:.4f} → " if before is not None else "") + f"{report['eval_loss_after']:.4f}")
    ui.print(f"saved artifact: {_esc(out)}")
    return 0


# -------------------------------------------------------------------------------- demo


def cmd_demo(args, ui: _UI, extra: list[str]) -> int:
    import importlib

    try:
        demo = importlib.import_module("splice.demo")
    except ModuleNotFoundError as e:
        if e.name == "splice.demo":
            raise SpliceError("demo: not available in this build (splice/demo.py is missing)") from e
        raise
    parser = argparse.ArgumentParser(prog=f"{PROG} demo", description=(demo.__doc__ or "").strip() or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(parser)
    dargs = parser.parse_args(extra)
    if not hasattr(dargs, "debug"):
        dargs.debug = args.debug
    return int(demo.main(dargs) or 0)


# ------------------------------------------------------------------------------ parser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show library output and full tracebacks")
    parser = argparse.ArgumentParser(
        prog=PROG, description="splice: capture a model once, rewrite it with passes, export it to ONNX Runtime.",
        epilog="Run `splice COMMAND --help` for a command's options.")
    parser.add_argument("--debug", action="store_true", default=False, help="show library output and full tracebacks")
    from splice import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("passes", parents=[common], help="list passes, or show one pass's options",
                       description="List every registered pass (name, summary, paper), or with NAME its options.")
    p.add_argument("name", nargs="?", help="a pass name, e.g. quantize.rtn")

    p = sub.add_parser("inspect", parents=[common], help="layers, sizes, op counts and pass history of a model",
                       description="Capture MODEL (HF directory, .gguf, .pt2) or load ARTIFACT and print its layers "
                                   "(path, op, kind, weight shape, bytes), stored bytes by role, op counts and, "
                                   "for artifacts, the pass history with fidelity numbers.")
    p.add_argument("model", metavar="MODEL|ARTIFACT")
    p.add_argument("--top-ops", type=_positive_int, default=12, metavar="N", help="op types listed (default 12)")

    p = sub.add_parser("run", parents=[common], help="run passes on a model and save an artifact",
                       description="Capture MODEL, run the passes (recipe first, then each -p in order), and save "
                                   "the result as an artifact directory OUT. Specs, recipe, calibration file and "
                                   "OUT are all checked before the model is captured; OUT is only written if "
                                   "every pass succeeds.",
                       epilog="example: splice run ./llama -p quantize.rtn:bits=4,group_size=32 -o llama-int4")
    p.add_argument("model", metavar="MODEL", help="HF directory, .gguf, .pt2 or splice artifact")
    p.add_argument("-p", "--pass", dest="passes", action="append", metavar="SPEC",
                   help="a pass, 'name:key=value,...' (repeatable; see `splice passes NAME`)")
    p.add_argument("--recipe", metavar="FILE", help="YAML recipe with a 'passes' list")
    p.add_argument("--calib", metavar="TEXTFILE", help="calibration text, for passes that need it")
    p.add_argument("--peft", action="append", metavar="DIR",
                   help="attach a PEFT adapter directory to the base before the passes (repeatable)")
    p.add_argument("--calib-samples", type=_positive_int, default=16, metavar="N",
                   help="calibration samples (default 16)")
    p.add_argument("--calib-seqlen", type=_positive_int, default=256, metavar="N",
                   help="tokens per calibration sample (default 256)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")

    p = sub.add_parser("export", parents=[common], help="export an artifact to ONNX",
                       description="Export ARTIFACT (or any model splice can capture) to an ONNX file. With --check "
                                   "the file is run with ONNX Runtime at two batch sizes and two sequence lengths "
                                   "and compared with torch; it is written only if the check passes.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--onnx", required=True, metavar="FILE", help="ONNX file to write")
    p.add_argument("--check", action="store_true", help="check ONNX Runtime parity against torch")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"--check tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")

    p = sub.add_parser("eval", parents=[common], help="perplexity of a model on a text file",
                       description="Perplexity of MODEL (HF directory, .gguf, .pt2 or artifact) on a text file, "
                                   "tokenized by the model's tokenizer: windows of --seq-len tokens every --stride "
                                   "tokens, each scoring only tokens no earlier window scored (the Hugging Face "
                                   "perplexity guide). With --ref also the reference's perplexity, and with "
                                   "--layers the output SQNR of every linear layer against it.",
                       epilog="example: splice eval llama-int4 --ppl wiki.txt --ref ./llama --layers")
    p.add_argument("model", metavar="MODEL|ARTIFACT")
    p.add_argument("--ppl", required=True, metavar="FILE", help="UTF-8 text to evaluate on")
    p.add_argument("--seq-len", type=_positive_int, default=512, metavar="N", help="tokens per window (default 512)")
    p.add_argument("--stride", type=_positive_int, default=None, metavar="N",
                   help="tokens between window starts (default: --seq-len, disjoint windows)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N", help="evaluate the first N tokens only")
    p.add_argument("--ref", metavar="MODEL", help="reference model (e.g. the unquantized one) to compare with")
    p.add_argument("--layers", action="store_true", help="per-layer output SQNR against --ref")
    p.add_argument("--layer-samples", type=_positive_int, default=4, metavar="N",
                   help="--seq-len windows used by --layers (default 4)")

    p = sub.add_parser("train", parents=[common], help="train adapters on a data file and save an artifact",
                       description="Capture MODEL (or load ARTIFACT), add adapters with -p, train the adapter "
                                   "tensors (everything else frozen) with AdamW on --data, and save the trained "
                                   "graph as an artifact OUT. Data: a text file (--loss causal_lm), JSONL "
                                   '{"anchor", "positive"} pairs (embedding) or {"text", "label"} lines '
                                   "(classification); see docs/training.md.",
                       epilog="example: splice train ./smollm2 --data train.txt --eval held.txt "
                              "-p adapter.lora:rank=8 --steps 200 --lr 1e-3 -o smollm2-lora")
    p.add_argument("model", metavar="MODEL|ARTIFACT")
    p.add_argument("--data", required=True, metavar="FILE", help="training data")
    p.add_argument("--eval", metavar="FILE", help="held-out data, evaluated before, every --eval-every steps and after")
    p.add_argument("-p", "--pass", dest="passes", action="append", metavar="SPEC",
                   help="a pass run before training, e.g. adapter.lora:rank=8 (repeatable)")
    p.add_argument("--loss", choices=("causal_lm", "embedding", "classification"), default="causal_lm")
    p.add_argument("--steps", type=_positive_int, default=100, metavar="N", help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=_positive_int, default=4, metavar="N", help="examples per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, metavar="N", help="micro-batches per step (default 1)")
    p.add_argument("--seq-len", type=_positive_int, default=256, metavar="N", help="tokens per example (default 256)")
    p.add_argument("--warmup", type=int, default=0, metavar="N", help="linear warm-up steps (default 0)")
    p.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off; default 1)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N", help="also evaluate every N steps")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="write a checkpoint here (resumable with --resume)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="steps between checkpoints (default 50)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")

    sub.add_parser("demo", parents=[common], add_help=False, help="the end-to-end demo (`splice demo --help`)",
                   description="The end-to-end demo; its options come from splice/demo.py.")
    return parser


_COMMANDS = {"passes": cmd_passes, "inspect": cmd_inspect, "run": cmd_run, "export": cmd_export,
             "eval": cmd_eval, "train": cmd_train}


def _error(msg: str) -> None:
    print(f"{PROG}: error: {_one_line(msg)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "demo":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help / --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    debug = bool(getattr(args, "debug", False))
    try:
        ui = _UI(debug)
        if args.command == "demo":
            return cmd_demo(args, ui, extra)
        return _COMMANDS[args.command](args, ui)
    except SystemExit as e:  # a nested parser (demo) exiting
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UsageError as e:
        if debug:
            raise
        _error(str(e))
        return 2
    except SpliceError as e:
        if debug:
            raise
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        _error("interrupted")
        return 130
    except OSError as e:  # FileNotFoundError, PermissionError, disk full …
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _error(f"{where}{e.strerror or e}")
        return 1
    except Exception as e:
        if debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)[:300]} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
