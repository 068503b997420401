"""Delta compression of real fine-tunes: BitDelta, ComPEFT, BitStack, DARE and SVD on the three LoRA
fine-tunes of SmolLM2-135M-Instruct that ``bench/merge.py`` trains (same domains, same cache: run
either first and the other reuses the fine-tunes).

For each fine-tune (docs, licences, code): ``delta.extract`` against the base, then each compressor;
reported per method: the delta's stored bytes (``Graph.bytes_by_role()['delta']``: packed payloads
at their stored size) against the dense float32 delta of the changed tensors, the relative error
‖Δ − Δ̂‖/‖Δ‖ the pass reports, the held-out loss on the fine-tune's own domain (mean next-token
nats) and the share of the fine-tune's gain over the base it keeps, ``(base − compressed) / (base −
fine-tune)``. BitDelta also with its scales distilled on the fine-tune's own training text (the
teacher: the fine-tune), ComPEFT with the paper's α = 1 and with the least-squares scale.
BitStack is decomposed once (``--levels``) and truncated to 25/50/75/100 % of its bytes. A LoRA fine-tune's folded delta has rank ≤ r per layer, so ``delta.svd`` at that rank is
exact: the row says how close to the floor each 1-bit method gets.

    python bench/delta.py                       # about 10 min on 2 cores once the fine-tunes are cached
    python bench/delta.py --steps 60 --seq-len 64 --eval-tokens 1024   # bench/merge.py's options pass through
    python bench/delta.py --quick --out /tmp/d.json --doc /tmp/d.md   # the zoo Llama, < 3 min
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merge as merge_bench  # noqa: E402  (the domains, the base and the cached fine-tunes)
from _common import logger, machine_info, replace_generated, versions, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_BEGIN, DOC_END = "<!-- bench/delta.py: begin generated -->", "<!-- bench/delta.py: end generated -->"
log = logger("delta")
DISTILL = 100  # BitDelta scale-distillation steps (on the fine-tune's own training text)


def compressors(rank: int, levels: int) -> dict[str, list[str]]:
    """Row name -> the pass specs after ``delta.extract``."""
    stack = f"delta.bitstack:levels={levels}"
    return {"dense (extract)": [], "bitdelta": ["delta.bitdelta"],
            f"bitdelta, scales distilled ({DISTILL} steps)": [f"delta.bitdelta:distill_steps={DISTILL},lr=1e-3"],
            "compeft density 0.1 (α = 1)": ["delta.compeft:density=0.1"],
            "compeft density 0.1 (least-squares scale)": ["delta.compeft:density=0.1,alpha=0"],
            "compeft density 0.3 (least-squares scale)": ["delta.compeft:density=0.3,alpha=0"],
            "dare density 0.1": ["delta.dare:density=0.1"], f"svd rank {rank}": [f"delta.svd:rank={rank}"],
            f"svd rank {max(1, rank // 4)}": [f"delta.svd:rank={max(1, rank // 4)}"],
            **{f"bitstack {levels} levels, {int(b * 100)} %": [stack, f"delta.bitstack:budget={b}"]
               for b in (0.25, 0.5, 0.75, 1.0)}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the zoo Llama fine-tunes of bench/merge.py --quick")
    ap.add_argument("--levels", type=int, default=8, help="BitStack levels decomposed (default 8)")
    ap.add_argument("--cache", default=None, help="bench/merge.py's fine-tune cache (default: its default)")
    ap.add_argument("--out", default="bench/results/delta.json")
    ap.add_argument("--doc", default="docs/bench_delta.md")
    ap.add_argument("--no-doc", action="store_true")
    return ap.parse_known_args(argv)  # the rest are bench/merge.py's fine-tuning and evaluation options


def delta_bytes(graph) -> int:
    return int(graph.bytes_by_role().get("delta", 0))


def compress(graph, base, specs: list[str], calibration: list, done: dict):
    """``graph`` as base + delta, compressed by ``specs`` (``calibration``: for the passes that read
    data), and the last pass's report; ``done`` keeps every prefix's result (a BitStack decomposed
    once serves every budget)."""
    import splice

    steps = ["delta.extract", *specs]
    for i in range(len(steps)):
        key = tuple(steps[:i + 1])
        if key not in done:
            start = done[key[:-1]][0] if i else graph
            result = splice.Pipeline([steps[i]]).run(start, graphs={"base": base}, probe=False, calibration=calibration)
            done[key] = (result.graph, result.reports[-1]["report"])
    return done[tuple(steps)]


def main(argv=None) -> int:
    args, merge_options = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from splice.eval.perplexity import tokenize

    margs = merge_bench.parse_args(["--quick"] * args.quick + (["--cache", args.cache] if args.cache else [])
                                   + merge_options)
    if margs.threads:
        torch.set_num_threads(margs.threads)
    texts = merge_bench.domain_texts()
    base, tokenizer, _, model = merge_bench.load_base(margs, texts)
    ids = {d: tokenize(base, held, tokenizer) for d, (_, held) in texts.items()}
    rows = compressors(margs.rank, args.levels)
    result = {"bench": "delta", "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
              "model": model, "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "versions": versions("splice", "torch", "transformers"),
              "settings": {"fine-tunes": "bench/merge.py's (LoRA rank %d, folded)" % margs.rank,
                           "evaluation": {"tokens": margs.eval_tokens, "seq_len": margs.eval_seq,
                                          "loss": "mean next-token nats on the fine-tune's own held-out domain"},
                           "bitstack_levels": args.levels},
              "domains": {}}
    for domain in merge_bench.DOMAINS:
        tuned, _ = merge_bench.fine_tune(base, tokenizer, domain, texts[domain][0], margs, model["name"])
        only = {domain: ids[domain]}
        calib = merge_bench.calibration(base, tokenizer, texts[domain][0], margs)
        ref = {"base": merge_bench.held_out_losses(base, only, margs)[domain],
               "fine-tune": merge_bench.held_out_losses(tuned, only, margs)[domain]}
        entry = result["domains"][domain] = {**ref, "rows": {}}
        dense, done = None, {}
        for name, specs in rows.items():
            start = time.perf_counter()
            graph, report = compress(tuned, base, specs, calib, done)
            seconds = time.perf_counter() - start
            loss = merge_bench.held_out_losses(graph, only, margs)[domain]
            dense = dense or delta_bytes(graph)
            entry["rows"][name] = {
                "bytes": delta_bytes(graph), "compression": round(dense / max(delta_bytes(graph), 1), 2),
                "rel_error": report.get("rel_error", 0.0), "loss": loss, "seconds": round(seconds, 1),
                "gain_kept": (ref["base"] - loss) / (ref["base"] - ref["fine-tune"])}
            log(f"{domain} {name}: {entry['rows'][name]['compression']}x, loss {loss:.4f} "
                f"(base {ref['base']:.4f}, fine-tune {ref['fine-tune']:.4f})")
            write_json(ROOT / args.out, result)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    write_json(ROOT / args.out, result)
    if not args.no_doc:
        replace_generated(ROOT / args.doc, DOC_BEGIN, DOC_END, render(result), "Delta compression on real fine-tunes")
    return 0


def render(r: dict) -> str:
    """The markdown tables of a result (one per domain)."""
    lines = [f"Model: {r['model']['name']}; fine-tunes: {r['settings']['fine-tunes']}; "
             f"loss: {r['settings']['evaluation']['loss']} ({r['settings']['evaluation']['tokens']} tokens); "
             f"load average at the end {r['machine']['loadavg_end'][0]:.1f}. Bytes: the stored delta (packed), "
             "compression against the dense float32 delta of the changed tensors.", ""]
    for domain, entry in r["domains"].items():
        lines += [f"**{domain}** — base {entry['base']:.4f}, fine-tune {entry['fine-tune']:.4f}", "",
                  "| delta | bytes | compression | rel. error | held-out loss | gain kept |", "|---|---:|---:|---:|---:|---:|"]
        for name, row in entry["rows"].items():
            lines.append(f"| {name} | {row['bytes']:,} | {row['compression']:.1f}× | {row['rel_error']:.3f} | "
                         f"{row['loss']:.4f} | {100 * row['gain_kept']:.0f} % |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
