"""ONNX Runtime vs ``graph.module()`` parity for every zoo model, fp32 and after RTN int4/int8.

Max abs difference over batch sizes {1, 3} x sequence lengths {5, 17}; writes JSON and
prints a markdown table (docs/parity.md holds the latest).

    python bench/parity.py --out bench/results/parity.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import splice  # noqa: E402
from splice.eval import zoo  # noqa: E402
from zoo_graphs import captured, input_grid  # noqa: E402

VARIANTS = {
    "fp32": None,
    "int4 g32 asym": "quantize.rtn:bits=4,group_size=32,symmetric=false,targets=linear|embedding",
    "int8 g32 sym": "quantize.rtn:bits=8,group_size=32,targets=linear|embedding",
    "int3 g32 sym": "quantize.rtn:bits=3,group_size=32,targets=linear|embedding",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/parity.json")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in zoo.ZOO_NAMES:
            zm, graph = captured(name)
            has_embedding = any(True for _ in graph.nodes("embedding"))
            for variant, spec in VARIANTS.items():
                g = graph if spec is None else graph.apply(spec if has_embedding else spec.replace("|embedding", ""))
                path = splice.export_onnx(g, Path(tmp) / f"{name}.onnx")
                results.setdefault(name, {})[variant] = splice.parity(g, path, input_grid(zm, g))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"max_abs_diff": results, "batches": [1, 3], "seqs": [5, 17]}, indent=2))
    print("| model | " + " | ".join(VARIANTS) + " |\n" + "|---" * (len(VARIANTS) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[v]:.1e}" for v in VARIANTS) + " |")


if __name__ == "__main__":
    main()
