"""Start-up time of the ``splice`` command against ``python -c "import torch"``, in one run.

Times, as fresh processes: ``python -c "import torch"`` (the reference), ``splice --help``, each
``splice COMMAND --help`` and ``splice passes`` (loads the pass registry). The commands run in
interleaved rounds (each round runs every command once, so a load change hits all of them) and
each command's median wall time over the rounds is reported with its ratio to the reference.
Targets (issue 13): ``--help`` at most 0.5x, ``splice passes`` at most 1.5x. The load average
before and after goes into the JSON, since the machine may be shared. Bytecode is cached as in a
normal install (into a temporary ``PYTHONPYCACHEPREFIX``, so a ``PYTHONDONTWRITEBYTECODE``
environment does not make every run recompile splice's sources); an untimed first round fills it.

    python bench/cli_startup.py --rounds 7 --out bench/results/cli_startup.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import logger, machine_info, versions, write_json  # noqa: E402

COMMANDS = ("passes", "inspect", "run", "export", "eval", "train", "demo")
HELP_LIMIT, PASSES_LIMIT = 0.5, 1.5
REFERENCE = "python -c 'import torch'"
log = logger("cli_startup")


def splice_exe() -> str:
    """The installed console script beside this interpreter (not a pyenv shim), else the one on PATH."""
    exe = Path(sys.executable).with_name("splice")
    found = str(exe) if exe.exists() else shutil.which("splice")
    if not found:
        raise SystemExit("cli_startup bench: the `splice` console script is not installed (pip install -e .)")
    return found


def cases(exe: str) -> dict[str, list[str]]:
    out = {REFERENCE: [sys.executable, "-c", "import torch"], "splice --help": [exe, "--help"]}
    out.update({f"splice {c} --help": [exe, c, "--help"] for c in COMMANDS})
    out["splice passes"] = [exe, "passes"]
    return out


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=300)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cli_startup bench: {' '.join(argv)} exited {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="timed runs of every command (median; default 7)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cli_startup.json"))
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="cli-startup-pycache-")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPYCACHEPREFIX": cache}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    runs = cases(splice_exe())
    load_start = os.getloadavg()
    for argv in runs.values():  # warm the page and bytecode caches once, untimed
        timed(argv, env)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, argv in runs.items():
            times[name].append(timed(argv, env))
        log(f"round {r + 1}/{args.rounds}: {REFERENCE} {times[REFERENCE][-1]:.2f} s, "
            f"splice passes {times['splice passes'][-1]:.2f} s")
    load_end = os.getloadavg()
    shutil.rmtree(cache, ignore_errors=True)
    ref = statistics.median(times[REFERENCE])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        limit = None if name == REFERENCE else PASSES_LIMIT if name == "splice passes" else HELP_LIMIT
        rows[name] = {"median_s": round(med, 3), "min_s": round(min(ts), 3), "ratio": round(med / ref, 3),
                      "limit": limit, "ok": None if limit is None else med / ref <= limit, "runs_s": ts}
    width = max(map(len, rows))
    print(f"{'command':<{width}}  median s  ratio  limit")
    for name, row in rows.items():
        limit = "" if row["limit"] is None else f"<= {row['limit']}  {'ok' if row['ok'] else 'OVER'}"
        print(f"{name:<{width}}  {row['median_s']:8.3f}  {row['ratio']:5.2f}  {limit}")
    print(f"load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; {args.rounds} rounds")
    path = write_json(args.out, {
        "bench": "cli_startup", "rounds": args.rounds, "bytecode_cache": "PYTHONPYCACHEPREFIX (temporary)",
        "reference": REFERENCE, "commands": rows,
        "all_ok": all(r["ok"] is not False for r in rows.values()),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in load_end],
        "machine": machine_info(), "versions": versions("torch", "splice"),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
