"""VeRA, MiSS/Bone (balance, Bat and mini) and AdaLoRA on real models: PEFT parity, fold/unfold, ONNX.

For all-MiniLM-L6-v2 (HF dir, BertModel) and SmolLM2-135M (GGUF, fp32): each method built with
real PEFT (``get_peft_model`` on the transformers model, every trainable adapter tensor redrawn
non-zero), saved with ``save_pretrained``, loaded with ``splice.load_peft``: max |splice − PEFT|,
trainable counts of both, ``save_peft`` → PEFT loads → max diff; then fold/unfold and ONNX Runtime
parity folded and unfolded (MiniLM only; SmolLM2's exports are the slow part and
``bench/dora_ia3_ssf.py`` already measures its fp32 export noise). Helpers from that bench.

    python bench/vera_bone_adalora.py      # writes bench/results/vera_bone_adalora.json
    python bench/vera_bone_adalora.py --methods miss_mini   # one method; other rows are kept
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import splice  # noqa: E402
from bench._common import machine_info, versions, write_json  # noqa: E402
from bench.dora_ia3_ssf import _first, _inputs, _paths, _peft_outputs, fold_and_export  # noqa: E402
from splice.frontends.hf import load_hf_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "vera_bone_adalora.json"
TARGETS = {"minilm": ["query", "value"], "smollm2": ["q_proj", "v_proj"]}


def peft_configs(targets: list[str]) -> dict:
    import peft

    return {"vera": peft.VeraConfig(r=256, target_modules=targets),
            "miss": peft.MissConfig(r=64, target_modules=targets),
            "miss_bat": peft.MissConfig(r=64, init_weights="bat", target_modules=targets),
            "miss_mini": peft.MissConfig(r=64, init_weights="mini", mini_r=64, target_modules=targets),
            "adalora": peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, total_step=100, target_modules=targets)}


def parity(path: Path, graph, config, inputs, tmp: Path) -> tuple[dict, splice.Graph]:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(load_hf_model(path), config).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in (p for p in pm.parameters() if p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        pm.save_pretrained(tmp / "peft")
        loaded = splice.load_peft(graph, tmp / "peft")
        ours = [_first(loaded.run(*x)) for x in inputs]
        splice.save_peft(loaded, tmp / "back", force=True)
        back = peft.PeftModel.from_pretrained(load_hf_model(path), tmp / "back").eval()
    diff = lambda ref: max(float((a - b).abs().max()) for a, b in zip(ours, ref))  # noqa: E731
    return {"max_abs_diff_vs_peft": diff(_peft_outputs(pm, graph, inputs)),
            "adapter_effect_max_abs": diff([_first(graph.run(*x)) for x in inputs]),
            "trainable_splice": sum(p.numel() for p in splice.adapter_parameters(loaded).values()),
            "trainable_peft": pm.get_nb_trainable_parameters()[0],
            "max_abs_diff_saved_back_in_peft": diff(_peft_outputs(back, graph, inputs))}, loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="all", help="comma-separated keys of peft_configs, or all")
    args = ap.parse_args()
    torch.set_num_threads(2)
    old = json.loads(OUT.read_text())["models"] if OUT.exists() else {}
    results = {"machine": machine_info(), "versions": versions("torch", "peft", "onnxruntime"), "models": old}
    for model, path in sorted(_paths().items()):
        graph = splice.capture(path)
        inputs = _inputs(graph)
        rows = results["models"].setdefault(model, {})
        for method, config in peft_configs(TARGETS[model]).items():
            if args.methods != "all" and method not in args.methods.split(","):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                row, loaded = parity(path, graph, config, inputs, Path(tmp))
                if model == "minilm":
                    row.update(fold_and_export(loaded, inputs, Path(tmp), method, True))
            rows[method] = row
            print(model, method, row, flush=True)
    write_json(OUT, results)


if __name__ == "__main__":
    main()
