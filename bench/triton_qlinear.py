"""The Triton ``splice::qlinear`` kernel against torch's fp16 matmul on a CUDA GPU.

SmolLM2-135M / Llama-7B-like layer shapes, int4 and int8, group 64 (asymmetric), activations in
fp16 at batch 1 (decode) and 16 rows: median milliseconds per call (CUDA events, after warm-up)
of (a) ``F.linear`` with the fp16 dense weight, (b) the Triton kernel, (c) the reference op
(dequantize then matmul), plus the kernel's max abs error against the reference. Writes JSON.

    python bench/triton_qlinear.py                       # needs a CUDA GPU and triton
    python bench/triton_qlinear.py --out bench/results/triton_qlinear.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import versions, write_json  # noqa: E402

SHAPES = {"smollm2.q_proj": (576, 576), "smollm2.up_proj": (1536, 576), "smollm2.down_proj": (576, 1536),
          "7b.q_proj": (4096, 4096), "7b.up_proj": (11008, 4096), "7b.down_proj": (4096, 11008)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,16", help="comma list of activation rows (batch x tokens)")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", default="bench/results/triton_qlinear.json")
    return ap.parse_args(argv)


def time_ms(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_layer(n: int, k: int, rows: int, bits: int, group_size: int, repeats: int) -> dict:
    from splice.kernels.quant.grid import GroupGrid, dequantize_packed
    from splice.kernels.quant import triton as kernel

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    grid = GroupGrid(bits, group_size, False)
    scale, zero = grid.params(w)
    dev = "cuda"
    q, s = grid.pack_codes(grid.quantize(w, scale, zero)).to(dev), scale.half().to(dev)
    z = grid.pack_zeros(zero).to(dev)
    x = torch.randn(rows, k, generator=gen).half().to(dev)
    w16 = grid.dequantize(grid.quantize(w, scale, zero), scale, zero).half().to(dev)

    def ref(x, q, s, z, bias, bits, group_size):  # the reference op's body, not the registered CUDA kernel
        return torch.nn.functional.linear(x, dequantize_packed(q, s, z, bits, group_size).to(x.dtype), bias)
    err = (kernel.qlinear(x, q, s, z, None, bits, group_size).float() - ref(x, q, s, z, None, bits, group_size).float())
    return {"fp16_matmul_ms": time_ms(lambda: torch.nn.functional.linear(x, w16), repeats),
            "triton_ms": time_ms(lambda: kernel.qlinear(x, q, s, z, None, bits, group_size), repeats),
            "reference_ms": time_ms(lambda: ref(x, q, s, z, None, bits, group_size), repeats),
            "max_abs_err": float(err.abs().max())}


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/triton_qlinear.py needs a CUDA GPU")
    import splice  # noqa: F401  (registers the ops)

    rows = []
    for name, (n, k) in SHAPES.items():
        for bits in (int(b) for b in args.bits.split(",")):
            for m in (int(r) for r in args.rows.split(",")):
                row = {"layer": name, "n": n, "k": k, "rows": m, "bits": bits, "group_size": args.group_size,
                       **bench_layer(n, k, m, bits, args.group_size, args.repeats)}
                row["speedup_vs_fp16"] = round(row["fp16_matmul_ms"] / row["triton_ms"], 3)
                print(row, flush=True)
                rows.append(row)
    write_json(args.out, {"bench": "triton_qlinear", "device": torch.cuda.get_device_name(),
                          "versions": versions("torch", "triton"), "rows": rows})


if __name__ == "__main__":
    main()
