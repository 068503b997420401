"""Captured zoo graphs shared by test modules (each captured once per session)."""
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import splice
from splice.eval import zoo


@functools.lru_cache(maxsize=None)
def captured(name: str):
    zm = zoo.build(name)
    return zm, splice.capture(zm.model, zm.example_inputs)


def input_grid(zm, graph, batches=(1, 3), seqs=(5, 17)):
    """Inputs at two batch sizes and two sequence lengths, in graph input order."""
    grid = []
    for b in batches:
        for s in seqs if zm.kind in ("decoder", "encoder") else seqs[:1]:
            kw = zm.make_inputs(b, s)
            grid.append(tuple(kw[n] for n in graph.input_names))
    return grid


def calibration(zm, graph, n=4, seq=24, seed=0):
    """``n`` calibration samples (batch 2 × ``seq`` tokens, seeds ``seed..seed+n-1``) in graph input order."""
    return [tuple(zm.make_inputs(2, seq, seed=seed + s)[k] for k in graph.input_names) for s in range(n)]
