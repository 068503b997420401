"""Training-step cost of the sparse-delta ops (forward + backward of one layer's update).

One linear of SmolLM2-135M's MLP size (``down_proj``: 1536 -> 576), 512 tokens, fp32, CPU, one thread.
Each candidate computes only its update ``x·ΔWᵀ`` and its gradients (x and trainable tensors);
the base layer's own GEMM is the same for all and left out:

* ``full``: a trainable dense ``ΔW`` (full fine-tuning of the layer), ``F.linear``;
* ``sparse_delta`` 5% (LIFT / SaRA), ``dsee_delta`` (r=8 + 1%);
* ``col_delta`` 10% of input columns (S2FT), ``row_delta`` 50% of rows (HFT);
* ``lora_delta`` r=8 for reference.

    python bench/sparse_delta_ops.py       # writes bench/results/sparse_delta_ops.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import splice  # noqa: E402,F401  (registers the ops)
from bench._common import interleaved_latency, machine_info, versions, write_json  # noqa: E402

OUT_F, IN_F, TOKENS = 576, 1536, 512
OUT = Path(__file__).resolve().parent / "results" / "sparse_delta_ops.json"
OPS = torch.ops.splice


def _param(*shape, gen):
    return torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.01)


def _mask(shape, fraction, gen):
    return torch.rand(shape, generator=gen) < fraction


def candidates(gen: torch.Generator) -> dict[str, tuple]:
    """name -> (function of x, trainable tensors)."""
    one = torch.ones(())
    m_sparse, m_dsee = _mask((OUT_F, IN_F), 0.05, gen), _mask((OUT_F, IN_F), 0.01, gen)
    cols, rows = _mask(IN_F, 0.10, gen), _mask(OUT_F, 0.5, gen)
    dw, a, b = _param(OUT_F, IN_F, gen=gen), _param(8, IN_F, gen=gen), _param(OUT_F, 8, gen=gen)
    v_sparse, v_dsee = _param(int(m_sparse.sum()), gen=gen), _param(int(m_dsee.sum()), gen=gen)
    v_cols, v_rows = _param(OUT_F, int(cols.sum()), gen=gen), _param(int(rows.sum()), IN_F, gen=gen)
    return {
        "full": (lambda x: F.linear(x, dw), [dw]),
        "sparse_delta 5%": (lambda x: OPS.sparse_delta(x, v_sparse, m_sparse, one), [v_sparse]),
        "dsee_delta r8+1%": (lambda x: OPS.dsee_delta(x, a, b, v_dsee, m_dsee, one), [a, b, v_dsee]),
        "col_delta 10%": (lambda x: OPS.col_delta(x, v_cols, cols, one), [v_cols]),
        "row_delta 50%": (lambda x: OPS.row_delta(x, v_rows, rows, one), [v_rows]),
        "lora_delta r8": (lambda x: OPS.lora_delta(x, a, b, one), [a, b]),
    }


def step(fn, params, x):
    def run():
        y = fn(x)
        torch.autograd.grad(y.square().mean(), [x, *params])
    return run


def main() -> None:
    torch.set_num_threads(1)  # the shared 2-core machine: thread hand-off would dominate
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, IN_F, generator=gen, requires_grad=True)
    cands = candidates(gen)
    lat = interleaved_latency({k: step(fn, ps, x) for k, (fn, ps) in cands.items()}, rounds=5, repeats=10)
    full = lat["full"]["median_s"]
    rows = {k: {"median_ms": round(v["median_s"] * 1e3, 3), "vs_full": round(v["median_s"] / full, 3),
                "trainable": sum(p.numel() for p in cands[k][1])} for k, v in lat.items()}
    data = {"layer": [OUT_F, IN_F], "tokens": TOKENS, "threads": torch.get_num_threads(), "results": rows,
            "machine": machine_info(), "versions": versions("torch")}
    print(write_json(OUT, data))
    for k, v in rows.items():
        print(f"{k:18s} {v['median_ms']:8.3f} ms  x{v['vs_full']:.2f} of full  trainable {v['trainable']:,}")


if __name__ == "__main__":
    main()
