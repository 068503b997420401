"""Shift-add (ShiftAddLLM's BCQ, ``reparam.shiftadd``) on SmolLM2-135M-Instruct against RTN and GPTQ, in one run.

Rows: fp32; asymmetric RTN 3-bit at group 64 (``quantize.rtn:bits=3,group_size=64,symmetric=false``,
the issue's baseline); GPTQ 3-bit at about BCQ's bytes (symmetric, group 48: 3.67 stored bits per
weight vs BCQ's 3.75); BCQ 3-bit and 2-bit at group 64, data-free and activation-aware
(``calib=true``); optionally ``reparam.shiftadd_allocate:avg_bits=2.5``. For each: strided perplexity on
the held-out 20 % of Python's help topics (calibration: the first 80 %), the targeted weights'
stored bytes (the pass report) and bits per weight, the graph's bytes, the pass's wall time and the
load average before and after it. JSON to ``bench/results/reparam.json``; ``docs/reparam.md`` quotes it.

    python bench/reparam.py                       # about 30 min on 2 busy cores
    python bench/reparam.py --rows rtn3,bcq3      # a subset
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import logger, machine_info, require_smollm2, versions, write_json  # noqa: E402

ROWS = {"rtn3": "quantize.rtn:bits=3,group_size=64,symmetric=false",
        "gptq3": "quantize.gptq:bits=3,group_size=48",
        "bcq3": "reparam.shiftadd:bits=3,group_size=64",
        "bcq3-calib": "reparam.shiftadd:bits=3,group_size=64,calib=true",
        "bcq2": "reparam.shiftadd:bits=2,group_size=64",
        "bcq2-calib": "reparam.shiftadd:bits=2,group_size=64,calib=true",
        "bcq-alloc2.5": "reparam.shiftadd_allocate:avg_bits=2.5,bits=2,3,4,group_size=64"}
log = logger("reparam")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="rtn3,gptq3,bcq3,bcq3-calib,bcq2,bcq2-calib", help="comma list of " + ",".join(ROWS))
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows (of --calib-seqlen tokens)")
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens evaluated")
    ap.add_argument("--seq-len", type=int, default=512, help="perplexity window and stride")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="bench/results/reparam.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"reparam bench: unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    gguf = require_smollm2("reparam")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import splice
    from splice.eval.calibration import text_calibration
    from splice.eval.data import builtin_text, split_text
    from splice.eval.perplexity import perplexity, tokenize

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"bench": "reparam", "command": " ".join(["bench/reparam.py"] + sys.argv[1:]), "machine": machine_info(),
              "versions": versions("splice", "torch", "onnxruntime"), "torch_threads": args.threads,
              "settings": {"calibration": {"text": "python-help, first 80%", "samples": args.calib_samples,
                                           "seq_len": args.calib_seqlen},
                           "perplexity": {"text": "python-help, held-out 20%", "max_tokens": args.max_tokens,
                                          "seq_len": args.seq_len, "stride": args.seq_len}},
              "rows": {}}
    log(f"capture {gguf}")
    graph = splice.capture(gguf)
    train, held = split_text(builtin_text("pydoc"), 0.2)  # bench/_common.domain_texts' in-domain split
    calib = text_calibration(graph, train, args.calib_samples, args.calib_seqlen)
    ids = tokenize(graph, held)

    def ppl(g) -> float:
        return perplexity(g, ids, seq_len=args.seq_len, stride=args.seq_len, max_tokens=args.max_tokens, batch_size=4)["ppl"]

    result["rows"]["fp32"] = {"ppl": ppl(graph), "graph_bytes": graph.nbytes()}
    log(f"fp32: ppl {result['rows']['fp32']['ppl']:.3f}")
    for name in rows:
        spec = ROWS[name]
        log(f"{name}: {spec}")
        load_before = os.getloadavg()
        t = time.perf_counter()
        out = splice.Pipeline([spec]).run(graph, calibration=calib, probe=False).graph
        seconds = time.perf_counter() - t
        report = out.history[-1]["report"]
        row = {"spec": spec, "seconds_apply": round(seconds, 1), "load_avg_before": load_before,
               "load_avg_after": os.getloadavg(), "weight_bytes_before": report["weight_bytes_before"],
               "weight_bytes_after": report["weight_bytes_after"], "graph_bytes": out.nbytes()}
        params = report["weight_bytes_before"] / 4  # float32 weights
        row["bits_per_weight"] = round(8 * report["weight_bytes_after"] / params, 4)
        if "avg_bits" in report:
            row["avg_bits"], row["plan"] = report["avg_bits"], report["plan"]
        row["ppl"] = ppl(out)
        result["rows"][name] = row
        log(f"{name}: ppl {row['ppl']:.3f}, {row['bits_per_weight']} bits/weight, {seconds:.0f} s, load {load_before[0]:.1f}")
        write_json(args.out, result)
        del out
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
