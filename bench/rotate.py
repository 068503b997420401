"""Does ``quantize.rotate`` help round-to-nearest? SmolLM2-135M-Instruct, RTN with and without
a Hadamard rotation of the residual stream first: perplexity on held-out text (the GPL-3,
``builtin_text("gpl3")``, disjoint 512-token windows) and the mean weight SQNR of the quantized
layers; plus fp32 and fp32 rotated (which must agree: the rotation is output-preserving).

    python bench/rotate.py                       # RTN w4 per-channel and w3 g64, sym
    python bench/rotate.py --specs quantize.rtn:bits=4,group_size=0
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import logger, machine_info, require_smollm2, versions, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPECS = "quantize.rtn:bits=4,group_size=0;quantize.rtn:bits=3,group_size=64"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=DEFAULT_SPECS, help="';'-separated quantizer specs, each run with and without rotate")
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens evaluated")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 and fp32-rotated rows")
    ap.add_argument("--out", default="bench/results/rotate.json")
    return ap.parse_args(argv)


log = logger("rotate")


def main(argv=None) -> int:
    args = parse_args(argv)
    gguf = require_smollm2("rotate")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import splice
    from splice.eval.data import builtin_text
    from splice.eval.perplexity import perplexity, tokenize

    graph = splice.capture(gguf)
    ids = tokenize(graph, builtin_text("gpl3"))
    rotated = graph.apply("quantize.rotate")
    result = {"bench": "rotate", "command": " ".join(["bench/rotate.py"] + sys.argv[1:]),
              "model": gguf.name, "machine": machine_info(), "versions": versions("torch", "scipy"),
              "rotate_report": rotated.history[-1]["report"], "max_tokens": args.max_tokens, "rows": {}}

    def measure(name: str, g) -> None:
        t = time.perf_counter()
        ppl = perplexity(g, ids, seq_len=512, max_tokens=args.max_tokens, batch_size=4)["ppl"]
        row = {"ppl": ppl, "seconds_eval": time.perf_counter() - t}
        rep = g.history[-1]["report"] if g.history else {}
        sq = [v for v in rep.get("weight_sqnr_db", {}).values() if math.isfinite(v)]
        if sq:
            row["weight_sqnr_db_mean"] = sum(sq) / len(sq)
        result["rows"][name] = row
        log(f"{name}: {row}")

    if not args.no_fp32:
        measure("fp32", graph)
        measure("fp32 rotated", rotated)
    for spec in [s for s in args.specs.split(";") if s]:
        measure(spec, graph.apply(spec))
        measure(f"rotate -> {spec}", rotated.apply(spec))
    write_json(ROOT / args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
