"""PV-Tuning against RTN, GPTQ and DiscQuant on the tiny zoo decoders (seconds, no download).

For each zoo model (llama, qwen2; random weights, so the measure is the KL divergence to the
float model's next-token distribution, not perplexity) at 2 and 3 bits, group 16, symmetric:
calibrate on 8 random batches of 2 x 32 tokens, report the KL on the calibration batches and on
4 held-out batches, and each pass's wall time. Writes ``bench/results/pvtune_zoo.json``
(after every row; rows of methods not run this time are kept).

    python bench/pvtune_zoo.py
    python bench/pvtune_zoo.py --methods pvtune,"pvtune init=gptq"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _common import machine_info, write_json  # noqa: E402
from zoo_graphs import captured  # noqa: E402

METHODS = {"rtn": "quantize.rtn", "gptq": "quantize.gptq", "discquant": "quantize.discquant:steps=60",
           "pvtune": "quantize.pvtune", "pvtune init=gptq": "quantize.pvtune:init=gptq",
           # ablation: the same 50 P iterations as the default schedule (5 P steps x 10), no V step
           "P steps only": "quantize.pvtune:steps=0,p_steps=50"}


REPORT_KEYS = ("codes_changed_per_v_step", "loss_before_after", "chosen_checkpoint", "p_step_learning_rates")


def batches(zm, graph, n: int, seed: int) -> list[tuple]:
    return [tuple(zm.make_inputs(2, 32, seed=seed + s)[k] for k in graph.input_names) for s in range(n)]


def kl(graph, quantized, samples) -> float:
    return sum(float(F.kl_div(F.log_softmax(quantized.run(*x)["logits"], -1).flatten(0, -2),
                              F.log_softmax(graph.run(*x)["logits"], -1).flatten(0, -2),
                              log_target=True, reduction="batchmean")) for x in samples) / len(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    methods = {m: METHODS[m] for m in ap.parse_args().methods.split(",")}
    out = ROOT / "bench/results/pvtune_zoo.json"
    torch.manual_seed(0)
    rows = json.loads(out.read_text())["rows"] if out.exists() else {}
    for model in ("llama", "qwen2"):
        zm, graph = captured(model)
        calib, held_out = batches(zm, graph, 8, 0), batches(zm, graph, 4, 100)
        for bits in (2, 3):
            for method, spec in methods.items():
                opts = f"bits={bits},group_size=16"
                spec = f"{spec},{opts}" if ":" in spec else f"{spec}:{opts}"
                t = time.perf_counter()
                q = graph.apply(spec, calibration=calib)
                seconds = time.perf_counter() - t
                report = q.history[-1]["report"]
                rows[f"{model} w{bits} {method}"] = {
                    "spec": spec, "kl_calibration": kl(graph, q, calib), "kl_held_out": kl(graph, q, held_out),
                    "seconds": seconds, **{k: report[k] for k in REPORT_KEYS if k in report}}
                print(f"{model} w{bits} {method:18s} KL calib {rows[f'{model} w{bits} {method}']['kl_calibration']:.3e}"
                      f"  held-out {rows[f'{model} w{bits} {method}']['kl_held_out']:.3e}  {seconds:.1f} s", flush=True)
                write_json(out, {"bench": "pvtune_zoo", "command": "python bench/pvtune_zoo.py", "machine": machine_info(),
                                 "settings": {"calibration": "8 x [2, 32] random tokens", "held_out": "4 x [2, 32]",
                                              "grid": "symmetric, group 16"}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
