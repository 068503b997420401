"""Every adapter type exported to ONNX and run in ONNX Runtime: unfolded, folded, adapter inputs.

For SmolLM2-135M (GGUF, fp32) and all-MiniLM-L6-v2 (HF dir, BertModel), and for every registered
pass that inserts an adapter (``adapter.*`` passes with an ``AdapterConfig``; passes that read a
second model, like ``adapter.extract``, are listed as skipped): the pass at its default config
(targets: every linear but ``lm_head``), every trainable adapter tensor moved by 0.05·N(0, 1)
(seeded, ``bench.adapters_factored._perturb``: a "trained" adapter), then

* ``unfolded``: ``splice.export_onnx`` of the adapted graph (adapter tensors as initializers);
* ``folded``: ``adapter.fold`` then export (the adapter merged into the base weights);
* ``inputs``: ``export_onnx(..., adapter_inputs=True)`` (adapter tensors as graph inputs with
  defaults), plus ``swap``: the same file fed a second adapter (perturbation seed 1) through
  its inputs, compared with that adapter's graph (a runtime swapping adapters without re-export);

each checked with ``splice.parity`` on two token windows of ``builtin_text("gpl3")`` whose shapes
differ from capture (1×17 and 2×33): max abs diff over every output, that diff / max |output|,
ONNX bytes (with external data) and export seconds. The base fp32 model's own ORT diff is measured
on the same inputs, with ORT's default graph optimizations and with ``ORT_DISABLE_ALL``, so an
adapter's diff can be compared with the export noise of the model it sits on. A pass whose default
targets match nothing in a model (``adapter.flora``: conv layers only) is recorded as n/a there and
measured on the zoo CNN instead (``zoo_cnn``).

    python bench/adapters_onnx.py --models minilm,zoo_cnn --inputs all
    nice -n 5 python bench/adapters_onnx.py --models smollm2 --inputs adapter.lora
    python bench/adapters_onnx.py --models smollm2 --float64   # float64 twins of the same exports
    # options: --methods adapter.lora,adapter.dora (default: all), --out FILE
    # default output bench/results/adapters_onnx.json; rows are written as they finish and rows
    # of earlier runs (other models or methods) are kept
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import splice  # noqa: E402
from bench._common import machine_info, versions, write_json  # noqa: E402
from bench.adapters_factored import _perturb  # noqa: E402
from bench.dora_ia3_ssf import _paths  # noqa: E402
from splice.runtime.adapter_inputs import with_adapter_inputs  # noqa: E402
from splice.errors import ConfigError  # noqa: E402
from splice.eval import zoo  # noqa: E402
from splice.eval.data import builtin_text, graph_inputs  # noqa: E402
from splice.ir.tokenizer import graph_tokenizer  # noqa: E402
from splice.passes.adapters._common import adapter_passes as registered_adapter_passes  # noqa: E402
from splice.runtime.float64 import double_module, double_outputs, double_parity  # noqa: E402
from splice.runtime.onnx import onnx_bytes, run_session  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "adapters_onnx.json"
SHAPES = ((1, 17), (2, 33))  # (batch, tokens): neither is a capture shape
BOUND = 1e-4
SANE = 0.2  # largest output change of a perturbed adapter, as a fraction of max |base output|


def adapter_passes() -> tuple[list[str], dict[str, str]]:
    """(passes that insert an adapter at their default config, {skipped pass: why})."""
    passes = registered_adapter_passes()
    return ([name for name, reads_source in passes.items() if not reads_source],
            {name: "reads a fine-tuned second model (option source); it writes an adapter.lora"
             for name, reads_source in passes.items() if reads_source})


def text_inputs(graph) -> list[tuple]:
    """Token windows of ``builtin_text("gpl3")`` at ``SHAPES``, in graph input order."""
    ids = graph_tokenizer(graph)(builtin_text("gpl3"), return_tensors="pt")["input_ids"][0]
    out = []
    for batch, seq in SHAPES:
        window = ids[:batch * seq].reshape(batch, seq)
        out.append(graph_inputs(graph, {"input_ids": window, "attention_mask": torch.ones_like(window)}))
    return out


def zoo_cnn() -> tuple[splice.Graph, list[tuple]]:
    zm = zoo.build("cnn")
    graph = splice.capture(zm.model, zm.example_inputs)
    return graph, [tuple(zm.make_inputs(b, seed=1)[n] for n in graph.input_names) for b, _ in SHAPES]


def outputs(graph, inputs) -> list[torch.Tensor]:
    return [t.detach() for x in inputs for t in graph.run(*x).values()]


def max_abs(ts: list[torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in ts)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def ort_outputs(graph, path: Path, inputs, level: str) -> list[torch.Tensor]:
    """ORT's outputs with graph optimization ``level`` (``ORT_ENABLE_ALL``, ``ORT_DISABLE_ALL``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(np.asarray(v)) for x in inputs for v in run_session(sess, graph, x).values()]


def float64_outputs(graph, inputs) -> list[torch.Tensor]:
    """The graph's outputs computed in float64 throughout (its own float32 casts widened too):
    a reference for both fp32 runtimes."""
    gm = double_module(graph.gm)
    return [t for x in inputs for t in double_outputs(gm, x)]


def export_row(graph, inputs, path: Path, scale: float, **kw) -> dict:
    """Export ``graph`` to ``path``, then ORT parity on ``inputs``, bytes and export seconds."""
    t = time.perf_counter()
    splice.export_onnx(graph, path, force=True, **kw)
    seconds = time.perf_counter() - t
    diff = splice.parity(graph, path, inputs)
    return {"max_abs_diff": diff, "rel_diff": diff / scale, "onnx_bytes": onnx_bytes(path), "seconds_export": seconds}


def base_row(graph, inputs, ref: list[torch.Tensor], tmp: Path) -> dict:
    """The unadapted model's own export noise, with ORT's default optimizations and with none."""
    row = export_row(graph, inputs, tmp / "base.onnx", max_abs(ref))
    fused, plain = (ort_outputs(graph, tmp / "base.onnx", inputs, level)
                    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"))
    exact = float64_outputs(graph, inputs)
    return row | {"max_abs_output": max_abs(ref), "max_abs_diff_ort_disable_all": max_diff(plain, ref),
                  "float64_reference": {"torch_fp32": max_diff(ref, exact), "ort": max_diff(fused, exact),
                                        "ort_disable_all": max_diff(plain, exact)}}


def adapted(graph, name: str, seed: int) -> splice.Graph:
    """``graph`` with adapter pass ``name`` applied and its trainable tensors perturbed."""
    return _perturb(graph.apply(name), seed)


def weighted(g, weight: float) -> splice.Graph:
    for adapter in {a.name for a in splice.list_adapters(g)}:
        g = splice.set_adapter_weight(g, adapter, weight)
    return g


def method_row(graph, name: str, inputs, base_out, tmp: Path, with_inputs: bool) -> dict:
    """One adapter pass: its effect on the outputs, then each export's ORT parity. The adapters'
    weight is lowered (``set_adapter_weight``) when the perturbation moves the outputs by more
    than ``SANE`` × max |base output|."""
    try:
        g = adapted(graph, name, seed=0)
    except ConfigError as e:
        return {"status": f"n/a ({e})"}
    out = outputs(g, inputs)
    effect = max_diff(out, base_out)
    weight = min(1.0, SANE * max_abs(base_out) / effect) if effect else 1.0
    row = {"status": "ok", "adapter_effect_at_weight_1": effect, "adapter_weight": weight}
    if weight < 1:
        g = weighted(g, weight)
        out = outputs(g, inputs)
    scale = max_abs(out)
    folded = g.apply("adapter.fold")
    row |= {"trainable": sum(p.numel() for p in splice.adapter_parameters(g).values()),
            "adapter_effect_max_abs": max_diff(out, base_out), "max_abs_output": scale,
            "torch_folded_vs_unfolded": max_diff(outputs(folded, inputs), out),
            "unfolded": export_row(g, inputs, tmp / "unfolded.onnx", scale),
            "folded": export_row(folded, inputs, tmp / "folded.onnx", scale)}
    if with_inputs:
        row["inputs"] = export_row(g, inputs, tmp / "inputs.onnx", scale, adapter_inputs=True)
        other = with_adapter_inputs(weighted(adapted(graph, name, seed=1), weight))
        extra = tuple(other.example_inputs[len(graph.input_names):])
        row["inputs"]["swap_max_abs_diff"] = splice.parity(other, tmp / "inputs.onnx", [x + extra for x in inputs])
    row["within_bound"] = all(row[k]["max_abs_diff"] <= BOUND for k in ("unfolded", "folded", "inputs") if k in row)
    return row


def float64_row(graph, name: str, inputs, weight: float) -> dict:
    """ORT vs torch with both in float64 (``splice/runtime/float64.py``), unfolded and folded: the
    translations' own error, without fp32 rounding. ``name`` "base": the unadapted model, and
    its fp32 torch outputs against the float64 ones."""
    if name == "base":
        exact = float64_outputs(graph, inputs)
        return {"model": double_parity(graph, inputs), "torch_fp32_vs_float64": max_diff(outputs(graph, inputs), exact)}
    g = weighted(adapted(graph, name, seed=0), weight)
    return {"unfolded": double_parity(g, inputs), "folded": double_parity(g.apply("adapter.fold"), inputs)}


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return "—"
    r = row[key]
    swap = f"; swap {r['swap_max_abs_diff']:.1e}" if "swap_max_abs_diff" in r else ""
    return f"{r['max_abs_diff']:.1e} ({r['rel_diff']:.0e}){swap}"


def _float64_cell(row: dict) -> str:
    """``float64_row``'s diffs: the base model's, or unfolded / folded."""
    f = row.get("float64")
    if f is None:
        return "—"
    if "model" in f:
        return f"{f['model']['max_abs_diff']:.1e}"
    return f"{f['unfolded']['max_abs_diff']:.1e} / {f['folded']['max_abs_diff']:.1e}"


def markdown_table(results: dict) -> str:
    """The results as a markdown table: one row per (model, method), the base model first."""
    lines = ["| model | method | weight | max \\|Δ output\\| | ORT unfolded abs (rel) | folded | adapter inputs "
             "| float64: unfolded / folded | MB unfolded / folded / inputs | export s unfolded / folded |",
             "|" + " --- |" * 10]
    for model, rows in results["models"].items():
        for name, row in rows.items():
            if name == "base":
                lines.append(f"| {model} | base fp32 | — | — | {_cell(rows, 'base')} | — | — | {_float64_cell(row)} "
                             f"| {row['onnx_bytes'] / 1e6:.3g} | {row['seconds_export']:.0f} |")
            elif row["status"] != "ok":
                lines.append(f"| {model} | {name} | {row['status']} |" + " |" * 7)
            else:
                mb = " / ".join(f"{row[k]['onnx_bytes'] / 1e6:.3g}" for k in ("unfolded", "folded", "inputs")
                                if k in row)
                lines.append(f"| {model} | {name} | {row['adapter_weight']:.2g} | {row['adapter_effect_max_abs']:.2g} "
                             f"| {_cell(row, 'unfolded')} | {_cell(row, 'folded')} | {_cell(row, 'inputs')} "
                             f"| {_float64_cell(row)} | {mb} "
                             f"| {row['unfolded']['seconds_export']:.0f} / {row['folded']['seconds_export']:.0f} |")
    return "\n".join(lines)


def save(path: Path, results: dict, model: str) -> None:
    """Write ``results`` with ``model``'s rows replacing that model's rows in ``path`` (other models' rows,
    possibly written meanwhile by another run, are kept)."""
    models = json.loads(path.read_text())["models"] if path.exists() else {}
    write_json(path, {**results, "models": {**models, model: results["models"][model]}})


def model_graph(model: str, paths: dict[str, Path]) -> tuple[splice.Graph, list[tuple]]:
    if model == "zoo_cnn":
        return zoo_cnn()
    graph = splice.capture(paths[model])
    return graph, text_inputs(graph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,zoo_cnn,smollm2")
    ap.add_argument("--methods", default="all", help="comma-separated pass names, all, or none (the base row only)")
    ap.add_argument("--inputs", default="adapter.lora", help="passes also exported with adapter_inputs=True, or all")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-base", action="store_true", help="keep the base row of an earlier run (saves one export)")
    ap.add_argument("--table", action="store_true", help="print the results in --out as a markdown table")
    ap.add_argument("--float64", action="store_true",
                    help="add float64 ORT-vs-torch cells to the rows already in --out (models without ORT float64 "
                         "kernels for their ops, e.g. BERT's Erf, fail)")
    args = ap.parse_args()
    if args.table:
        return print(markdown_table(json.loads(args.out.read_text())))
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # not the "initializer appears in graph inputs" warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    inserting, skipped = adapter_passes()
    methods = {"all": inserting, "none": []}.get(args.methods, args.methods.split(","))
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = {"machine": machine_info(), "versions": versions("torch", "onnx", "onnxruntime", "onnxscript"),
               "note": "2-core machine shared with other jobs: export seconds are not benchmarks",
               "shapes": SHAPES, "sane_fraction": SANE,
               "perturbation": "every trainable adapter tensor += 0.05 * N(0, 1), seed 0 (swap: seed 1)",
               "skipped": skipped, "models": old.get("models", {})}
    paths = _paths()
    for model in args.models.split(","):
        if model not in paths and model != "zoo_cnn":
            print(f"{model}: not installed, skipped", flush=True)
            continue
        graph, inputs = model_graph(model, paths)
        rows = results["models"].setdefault(model, {})
        if args.float64:
            for name in ["base"] + methods:
                if name == "base" or rows.get(name, {}).get("status") == "ok":
                    rows[name]["float64"] = float64_row(graph, name, inputs, rows[name].get("adapter_weight", 1.0))
                    print(model, name, "float64", rows[name]["float64"], flush=True)
                    save(args.out, results, model)
            continue
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            base_out = outputs(graph, inputs)
            if not args.no_base:
                rows["base"] = base_row(graph, inputs, base_out, tmp)
                print(model, "base", rows["base"], flush=True)
                save(args.out, results, model)
            for name in methods:
                rows[name] = method_row(graph, name, inputs, base_out, tmp, args.inputs == "all"
                                        or name in args.inputs.split(","))
                print(model, name, rows[name], flush=True)
                save(args.out, results, model)


if __name__ == "__main__":
    main()
