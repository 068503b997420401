"""``splice eval MODEL --ppl FILE [FILE ...]``: perplexity on text files, optionally against a reference model."""
from __future__ import annotations

import math
import time

from splice import progress
from splice.cli.ui import UI, UsageError, capture, esc, fmt_num, positive_int, require_exists
from splice.errors import SpliceError

HELP = "perplexity of a model on text files"


def add_parser(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], help=HELP,
                       description="Perplexity of MODEL (HF directory, .gguf, .pt2 or artifact) on each text file, "
                                   "tokenized by the model's tokenizer: windows of --seq-len tokens every --stride "
                                   "tokens, each scoring only tokens no earlier window scored (the Hugging Face "
                                   "perplexity guide); with several files also their geometric mean and the "
                                   "worst file. With --ref also the reference's perplexities, and with --layers the "
                                   "output SQNR of every linear layer against it (on the first file).",
                       epilog="example: splice eval llama-int4 --ppl wiki.txt code.txt --ref ./llama --layers")
    p.add_argument("model", metavar="MODEL|ARTIFACT")
    p.add_argument("--ppl", required=True, nargs="+", action="extend", metavar="FILE",
                   help="UTF-8 text files to evaluate on (several: per file, then their geometric mean)")
    p.add_argument("--seq-len", type=positive_int, default=512, metavar="N", help="tokens per window (default 512)")
    p.add_argument("--stride", type=positive_int, default=None, metavar="N",
                   help="tokens between window starts (default: --seq-len, disjoint windows)")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="evaluate the first N tokens of each file only")
    p.add_argument("--ref", metavar="MODEL", help="reference model (e.g. the unquantized one) to compare with")
    p.add_argument("--layers", action="store_true", help="per-layer output SQNR against --ref")
    p.add_argument("--layer-samples", type=positive_int, default=4, metavar="N",
                   help="--seq-len windows used by --layers (default 4)")
    p.set_defaults(func=run)


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


def run(args, ui: UI) -> int:
    from splice.eval.data import read_text
    from splice.eval.perplexity import check_logits

    # 1. everything that needs no model
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
