"""``splice eval MODEL --ppl FILE [FILE ...]``: perplexity on text files, optionally against a reference
model; ``splice eval lmc A B --data FILE`` (or ``splice eval A --lmc B …``): linear mode
connectivity of two models (``eval/lmc.py``)."""
from __future__ import annotations

import argparse
import json
import math
import time

from splice import progress
from splice.cli.ui import UI, UsageError, capture, esc, fmt_num, positive_int, require_exists, require_file
from splice.errors import SpliceError

HELP = "perplexity of a model on text files, or the loss path between two models (--lmc)"
DEFAULT_SEQ_LEN = 512


def add_parser(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], help=HELP,
                       description="Perplexity of MODEL (HF directory, .gguf, .pt2 or artifact) on each text file, "
                                   "tokenized by the model's tokenizer: windows of --seq-len tokens every --stride "
                                   "tokens, each scoring only tokens no earlier window scored (the Hugging Face "
                                   "perplexity guide); with several files also their geometric mean and the "
                                   "worst file. With --ref also the reference's perplexities, and with --layers the "
                                   "output SQNR of every linear layer against it (on the first file). "
                                   "With --lmc B instead: the label-free loss along the straight line from MODEL's "
                                   "weights to B's on --data, its barrier (the largest excess over the line between "
                                   "the endpoints' losses), and per layer the mean |cos| of matched top-k left "
                                   "singular vectors; --align also after permuting B's units onto MODEL's "
                                   "(merge.permute, Git Re-Basin weight matching).",
                       epilog="examples: splice eval llama-int4 --ppl wiki.txt code.txt --ref ./llama --layers; "
                              "splice eval lmc ./run-a ./run-b --data wiki.txt --align")
    p.add_argument("model", metavar="MODEL|ARTIFACT")
    p.add_argument("pair", nargs="*", metavar="A B", help="`splice eval lmc A B`: the same as `splice eval A --lmc B`")
    p.add_argument("--ppl", nargs="+", action="extend", metavar="FILE",
                   help="UTF-8 text files to evaluate on (several: per file, then their geometric mean)")
    p.add_argument("--seq-len", type=positive_int, default=None, metavar="N",
                   help=f"tokens per window (default {DEFAULT_SEQ_LEN}; --lmc: at most the model's positions)")
    p.add_argument("--stride", type=positive_int, default=None, metavar="N",
                   help="tokens between window starts (default: --seq-len, disjoint windows)")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="evaluate the first N tokens of each file only")
    p.add_argument("--ref", metavar="MODEL", help="reference model (e.g. the unquantized one) to compare with")
    p.add_argument("--layers", action="store_true", help="per-layer output SQNR against --ref")
    p.add_argument("--layer-samples", type=positive_int, default=4, metavar="N",
                   help="--seq-len windows used by --layers (default 4)")
    lmc = p.add_argument_group("linear mode connectivity (--lmc)")
    lmc.add_argument("--lmc", metavar="MODEL", help="the second model: the loss path from MODEL to it")
    lmc.add_argument("--data", metavar="FILE", help="UTF-8 text the loss is measured on (calibration windows)")
    lmc.add_argument("--samples", type=positive_int, default=None, metavar="N",
                     help="windows of --data (default: sized to the model, as calibration)")
    lmc.add_argument("--points", type=_points, default=11, metavar="N",
                     help="points on the path, endpoints included (default 11)")
    lmc.add_argument("--align", action="store_true", help="also the path after permutation alignment (merge.permute)")
    lmc.add_argument("--top-k", type=positive_int, default=8, metavar="K",
                     help="singular vectors compared per layer (default 8)")
    lmc.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    p.set_defaults(func=run)


def _points(text: str) -> int:
    """argparse type: an integer >= 2 (the path's two endpoints at least)."""
    n = positive_int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 points (the endpoints), got {n}")
    return n


def _ppl_line(label: str, r: dict, seconds: float) -> str:
    return (f"{label}perplexity {r['ppl']:.4f}  (nll {r['nll']:.4f} nats/token over {r['tokens']:,} tokens; "
            f"{r['windows']} windows of {r['seq_len']}, stride {r['stride']}; {seconds:.1f} s)")


def _layers(args, ui: UI, ref, graph, ids) -> None:
    """The per-layer output SQNR table against ``--ref`` and its worst/mean line."""
    from rich.table import Table

    from splice.eval.perplexity import layer_sqnr

    n = min(args.layer_samples, ids.shape[1] // args.seq_len)
    samples = [ids[:, i * args.seq_len:(i + 1) * args.seq_len] for i in range(n)]
    with ui.phase("compare layers"):
        rows = layer_sqnr(ref, graph, [{"input_ids": s} for s in samples])
    table = Table(title=f"per-layer output SQNR vs {esc(args.ref)} ({n} × {args.seq_len} tokens)",
                  title_justify="left")
    for col, just in (("layer", "left"), ("op", "left"), ("sqnr dB", "right"), ("cosine", "right"),
                      ("max abs", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for row in rows:
        table.add_row(esc(row["path"]), esc(row["op_test"]), fmt_num(row["sqnr_db"], ".2f"),
                      fmt_num(row["cosine"], ".5f"), fmt_num(row["max_abs"], ".3g"))
    ui.print(table)
    finite = [r["sqnr_db"] for r in rows if math.isfinite(r["sqnr_db"])]
    if finite:
        worst = min(rows, key=lambda r: r["sqnr_db"])
        ui.print(f"worst layer: {esc(worst['path'])} at {worst['sqnr_db']:.2f} dB; "
                 f"mean {sum(finite) / len(finite):.2f} dB over {len(finite)} changed layers")


def _token_ids(args, ui: UI, graph, texts: list[str]) -> list:
    """Each text as ``graph``'s token ids, cut to ``--max-tokens``; SpliceError naming a file too short."""
    from splice.eval.perplexity import tokenize

    with ui.phase("tokenize"):
        ids = [tokenize(graph, text)[:, :args.max_tokens] for text in texts]
    for path, x in zip(args.ppl, ids):
        if x.shape[1] < args.seq_len:
            raise SpliceError(f"{path}: text too short: {x.shape[1]:,} tokens, need at least {args.seq_len} for "
                              f"one window (--seq-len {args.seq_len})" + (f" after --max-tokens {args.max_tokens}"
                                                                          if args.max_tokens else ""))
    return ids


def _delta_line(prefix: str, ppl: float, ref_ppl: float) -> str:
    d = ppl - ref_ppl
    return f"{prefix}vs reference: {d:+.4f} ({100 * d / ref_ppl:+.2f}%)"


def _eval_file(args, ui: UI, stride: int, path: str, ids, models: list) -> list[float]:
    """Prints and returns the perplexity of each of ``models`` (``(label, graph)``) on one file's tokens."""
    from splice.eval.perplexity import perplexity

    ppls = []
    for label, g in models:
        start = time.perf_counter()
        with ui.quiet(redirect=not progress.enabled()):
            r = perplexity(g, ids, seq_len=args.seq_len, stride=stride, progress=progress.enabled())
        ui.print(_ppl_line(f"{esc(path)}: {label}", r, time.perf_counter() - start))
        ppls.append(r["ppl"])
    if len(ppls) == 2:
        ui.print(_delta_line(f"{esc(path)}: ", *ppls))
    return ppls


def _summary(ui: UI, paths: list[str], labels: list[str], rows: list[list[float]]) -> None:
    """Per model, the geometric mean of the files' perplexities and the worst file; then the mean's delta."""
    from splice.eval.perplexity import geometric_mean

    means = []
    for label, ppls in zip(labels, zip(*rows)):
        worst = max(range(len(ppls)), key=ppls.__getitem__)
        means.append(geometric_mean(ppls))
        ui.print(f"geometric mean {label}perplexity {means[-1]:.4f} over {len(ppls)} files; "
                 f"worst: {esc(paths[worst])} {ppls[worst]:.4f}")
    if len(means) == 2:
        ui.print(_delta_line("geometric mean ", *means))


def _lmc_tables(ui: UI, result: dict) -> None:
    """The loss along the path(s), the barriers, and the per-layer singular-vector alignment."""
    from rich.table import Table

    paths = [key for key in ("naive", "aligned") if key in result]
    a, b = (esc(n) for n in result["models"])
    table = Table(title=f"loss from {a} (α = 0) to {b} (α = 1) on {result['samples']} samples", title_justify="left")
    table.add_column("α", justify="right")
    for key in paths:
        table.add_column(f"loss {key}", justify="right")
    for i, alpha in enumerate(result["alphas"]):
        table.add_row(f"{alpha:.2f}", *(fmt_num(result[key]["losses"][i], ".4f") for key in paths))
    ui.print(table)
    for key in paths:
        ui.print(f"barrier {key}: {result[key]['barrier']:.4f}")
    layers = Table(title="per-layer alignment: mean |cos| of matched top-k left singular vectors", title_justify="left")
    layers.add_column("layer", overflow="fold")
    for key in paths:
        layers.add_column(key, justify="right")
    for row in result["layers"]:
        layers.add_row(esc(row["layer"]), *(fmt_num(row[key], ".3f") for key in paths))
    ui.print(layers)


def _run_lmc(args, ui: UI) -> int:
    """``--lmc``: the loss path between MODEL and the second model (``eval/lmc.py``)."""
    import splice
    from splice.eval.calibration import text_calibration
    from splice.eval.data import read_text
    from splice.eval.lmc import lmc

    given = [flag for flag, on in (("--ppl", args.ppl), ("--ref", args.ref), ("--layers", args.layers),
                                    ("--stride", args.stride), ("--max-tokens", args.max_tokens)) if on]
    if given:
        raise UsageError(f"eval: --lmc measures a loss path on --data; {given[0]} belongs to perplexity (--ppl)")
    if not args.data:
        raise UsageError("eval: --lmc needs --data FILE (the text the loss is measured on)")
    text = read_text(require_file(args.data, "--data"))
    require_exists(args.model, args.lmc)
    a, _ = capture(args.model, ui)
    b, _ = capture(args.lmc, ui)
    with ui.phase("calibration windows"):
        data = text_calibration(a, text, args.samples, args.seq_len)
    aligned = None
    if args.align:
        with ui.phase("align (merge.permute)"):
            aligned = splice.merge([a, b], "permute", t=1.0, names=[args.model, args.lmc])
    with ui.phase("loss along the path"):
        result = lmc(a, b, data, points=args.points, aligned=aligned, top_k=args.top_k, names=(args.model, args.lmc))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _lmc_tables(ui, result)
    return 0


def run(args, ui: UI) -> int:
    from splice.eval.data import read_text
    from splice.eval.perplexity import check_logits

    if args.pair:
        if args.model != "lmc" or len(args.pair) != 2 or args.lmc:
            raise UsageError(f"eval: one MODEL, or `lmc A B`; got {' '.join([args.model, *args.pair])}")
        args.model, args.lmc = args.pair
    if args.lmc:
        return _run_lmc(args, ui)
    # 1. everything that needs no model
    lmc_only = [flag for flag, on in (("--data", args.data), ("--samples", args.samples), ("--align", args.align),
                                       ("--json", args.json)) if on]
    if lmc_only:
        raise UsageError(f"eval: {lmc_only[0]} belongs to --lmc MODEL")
    if not args.ppl:
        raise UsageError("eval: give --ppl FILE (perplexity) or --lmc MODEL (the loss path to a second model)")
    args.seq_len = args.seq_len or DEFAULT_SEQ_LEN
    stride = args.stride or args.seq_len
    if stride > args.seq_len:
        raise UsageError(f"eval: --stride {stride} is larger than --seq-len {args.seq_len} (tokens would be skipped)")
    if args.layers and not args.ref:
        raise UsageError("eval: --layers compares against a reference model; add --ref MODEL")
    texts = [read_text(path) for path in args.ppl]
    require_exists(args.model, args.ref)

    # 2. load, tokenize (the evaluated model's tokenizer), evaluate
    graph, cap_s = capture(args.model, ui)
    check_logits(graph)
    ref = None
    if args.ref:
        ref, _ = capture(args.ref, ui)
        check_logits(ref)
    ids = _token_ids(args, ui, graph, texts)
    sizes = ", ".join(f"{esc(path)}: {x.shape[1]:,} tokens" for path, x in zip(args.ppl, ids))
    ui.print(f"[bold]{esc(graph.source.get('name', args.model))}[/bold]  (loaded in {cap_s:.1f} s; {sizes})")
    models = [(label, g) for label, g in (("", graph), ("reference ", ref)) if g is not None]
    rows = [_eval_file(args, ui, stride, path, x, models) for path, x in zip(args.ppl, ids)]
    if len(rows) > 1:
        _summary(ui, args.ppl, [label for label, _ in models], rows)
    if args.layers:
        _layers(args, ui, ref, graph, ids[0])
    return 0
