"""GPTQ's options across domains on SmolLM2-135M-Instruct: the study behind GPTQ's defaults
(docs/calibration.md, "Measured: GPTQ's defaults across domains").

Each variant is ``name|spec|samples|seq_len``: the pass ``spec`` calibrated on ``samples`` windows of
``seq_len`` tokens of the first 80 % of Python's help topics (``_common.domain_texts``), then
perplexity (windows of 512, at most ``--max-tokens`` a domain) on the four domains; one JSON line
per variant is appended to ``--out``, with the load average.

    python bench/gptq_defaults.py --variants "fp32|fp32|0|0" "rtn|quantize.rtn:bits=3,group_size=64|0|0" \\
        "new|quantize.gptq:bits=3,group_size=64|48|512" "old|quantize.gptq:bits=3,group_size=64,damp_auto=false,clip=minmax,act_order=false,holdout=0|16|256"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import IN_DOMAIN, domain_texts, require_smollm2  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", required=True, help="name|spec|samples|seq_len (spec 'fp32': no pass)")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", default="bench/results/gptq_defaults.jsonl")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import splice
    from splice.eval.calibration import text_calibration
    from splice.eval.perplexity import geometric_mean, perplexity, tokenize

    graph = splice.capture(require_smollm2("gptq_defaults"))
    train, texts = domain_texts()
    ids = {name: tokenize(graph, text)[:, :args.max_tokens] for name, text in texts.items()}
    for variant in args.variants:
        name, spec, samples, seq_len = variant.split("|")
        start = time.perf_counter()
        calib = text_calibration(graph, train, int(samples), int(seq_len)) if int(samples) else None
        q = graph if spec == "fp32" else graph.apply(spec, calibration=calib, verify=False)
        seconds = time.perf_counter() - start
        ppl = {d: round(perplexity(q, x, seq_len=512, batch_size=4)["ppl"], 2) for d, x in ids.items()}
        ppl["ood"] = round(geometric_mean([v for d, v in ppl.items() if d != IN_DOMAIN]), 2)
        row = {"name": name, "spec": spec, "calib": [int(samples), int(seq_len)], "seconds": round(seconds, 1),
               "ppl": ppl, "load": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
