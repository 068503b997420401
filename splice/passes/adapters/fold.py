"""``adapter.fold`` / ``adapter.unfold``: merge adapters into their base weights and back.

Folding replaces ``base(x) + Σ delta_i(x)`` by ``base'(x)`` with ``W' = W + Σ ΔW_i`` (LoRA's
"no additional inference latency" merge, https://arxiv.org/abs/2106.09685): exact for a float
base; a quantized base is dequantized, updated and re-quantized on the same format, and the
re-quantization error is reported per layer. With ``keep=true`` (PEFT's ``merge_adapter``) a
``splice::folded_adapter`` record beside the base keeps the adapter's tensors (and the base's
original packed tensors when it was quantized or tied), so ``adapter.unfold`` restores the base
weights (float: ``W' - ΔW``, within 1e-6; quantized or tied: the originals, exactly) and
re-creates the adapters. The record computes nothing and export drops it. ``keep=false`` is
PEFT's ``merge_and_unload``. How each base op folds (and how a masked base will keep its
sparsity) lives in ``_base.py``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.passes.adapters._base import base_op
from splice.passes.adapters._common import (
    FOLDED,
    attach,
    check_name,
    detach,
    layer_path,
    method_named,
    records,
    refresh_reads,
    sites,
    unknown_adapter,
)
from splice.passes.base import PassConfig, PassContext, PassResult, register_pass

_REF = "https://arxiv.org/abs/2106.09685"


@dataclass(frozen=True, kw_only=True)
class _ByName(PassConfig):
    name: str = field(default="", metadata={"help": "adapter name; empty = every active (fold) / folded (unfold) one"})

    def __post_init__(self):
        if self.name:
            check_name(self.name)


@dataclass(frozen=True, kw_only=True)
class FoldConfig(_ByName):
    """Merge adapters into the base weights (exact on float bases; re-quantizes quantized ones)."""

    keep: bool = field(default=True, metadata={"help": "keep what adapter.unfold needs (false: merge and unload)"})


@dataclass(frozen=True, kw_only=True)
class UnfoldConfig(_ByName):
    """Restore folded adapters: base weights back as they were, adapters re-created."""


@register_pass("adapter.fold", FoldConfig, reference=_REF, requires=("adapter",),
               report_fields={"folded": "adapters folded"})
def fold(graph: Graph, cfg: FoldConfig, ctx: PassContext) -> PassResult:
    who = "adapter.fold"
    every = sites(graph)
    if not every:
        raise ConfigError(f"{who}: the graph has no unfolded adapter (add one with adapter.lora or splice.load_peft)")
    chosen = [s for s in every if s.name == cfg.name] if cfg.name else [s for s in every if s.meta.get("active", True)]
    if cfg.name and not chosen:
        raise unknown_adapter(who, cfg.name, graph)
    if not chosen:
        raise ConfigError(f"{who}: every adapter is deactivated; nothing to fold (activate one or name it)")
    by_base = defaultdict(list)
    for s in chosen:
        by_base[s.base].append(s)
    layers = {}
    for base, group in by_base.items():
        handler = base_op(base, who)
        shape = handler.shape(graph, base, who)
        replaced = any(s.method.affine for s in group)
        if replaced:
            originals, report = _fold_affine(graph, base, handler, group, shape, who), {}
        else:
            dw = sum(s.method.dense(s.tensors(graph), shape) for s in group)
            originals, report = handler.fold(graph, base, dw)
        layers[layer_path(base)] = {"adapters": [s.name for s in group], **report}
        if cfg.keep:
            _record(graph, base, group, originals, replaced)
        for s in group:
            detach(graph, s)
        refresh_reads(base)
    return PassResult(graph, True, {"folded": len(chosen), "layers": layers})


def _fold_affine(graph: Graph, base, handler, group, shape, who: str):
    """Fold adapters whose update depends on the base (DoRA, IA3, SSF; others in the group add
    their dense update): ``W' = W + Σ ΔW_i(W, b)``, ``b' = b + Σ Δb_i``, on new tensors, so the
    originals come back exactly on unfold."""
    if handler.replace is None:
        names = ", ".join(s.method.name for s in group if s.method.affine)
        raise ConfigError(f"{who}: layer '{layer_path(base)}' ({base.target}) cannot fold {names} (no float weight)")
    w, b = handler.weight(graph, base), handler.bias(graph, base)
    dw, db = torch.zeros_like(w), None
    for s in group:
        t = s.tensors(graph)
        d, e = s.method.affine(t, w, b) if s.method.affine else (s.method.dense(t, shape), None)
        dw = dw + d
        db = e if db is None else db if e is None else db + e
    return handler.replace(graph, base, w + dw, None if db is None else db if b is None else b + db)


def _record(graph: Graph, base, group, originals, replaced: bool) -> None:
    spec = {"path": layer_path(base), "base_op": str(base.target), "originals": list(originals),
            "adapters": [{"name": s.name, "method": s.method.name, "meta": s.meta} for s in group]}
    if replaced:
        spec["replaced"] = True  # the base points at new tensors; unfold points it back
    tensors = [n for s in group for n in s.nodes().values()] + list(originals.values())
    after = ([base] + [u for u in base.users if u.target == FOLDED])[-1]  # records stay in fold order
    with graph.gm.graph.inserting_after(after):
        rec = graph.gm.graph.call_function(FOLDED, (base, tensors, json.dumps(spec, sort_keys=True)))
    rec.meta["nn_module_stack"] = base.meta.get("nn_module_stack", {})


@register_pass("adapter.unfold", UnfoldConfig, reference=_REF, requires=("adapter.fold",), provides=("adapter",),
               report_fields={"unfolded": "adapters unfolded"})
def unfold(graph: Graph, cfg: UnfoldConfig, ctx: PassContext) -> PassResult:
    who, recs = "adapter.unfold", records(graph)
    picked = [r for r in recs if not cfg.name or any(a["name"] == cfg.name for a in r.spec["adapters"])]
    if not recs:
        raise ConfigError(f"{who}: nothing to unfold: no adapter was folded (run adapter.fold with keep=true first)")
    if not picked:
        raise unknown_adapter(who, cfg.name, graph)
    per_base = defaultdict(list)
    for r in recs:
        per_base[r.base].append(r)
    taken = {(s.path, s.name) for s in sites(graph)}
    restored = []
    for rec in reversed(picked):
        base, path = rec.base, rec.spec["path"]
        if str(base.target) != rec.spec["base_op"]:
            raise ConfigError(f"{who}: layer '{path}' was rewritten after adapter.fold ({rec.spec['base_op']} -> "
                              f"{base.target}); unfold before that pass")
        later = per_base[base][per_base[base].index(rec) + 1:]
        kept = [r for r in later if r not in picked]
        if kept and (rec.spec["originals"] or any(r.spec.get("replaced") for r in kept)):
            names = ", ".join(a["name"] for r in later for a in r.spec["adapters"])
            raise ConfigError(f"{who}: on layer '{path}' unfold '{names}' first (folded later into the same weights)")
        adapters = rec.adapter_nodes()
        for entry, _ in adapters:
            if (path, entry["name"]) in taken:
                raise ConfigError(f"{who}: layer '{path}' already has an adapter named '{entry['name']}'")
        handler = base_op(base, who)
        if rec.spec.get("replaced"):
            handler.unreplace(graph, base, rec.originals())
        else:
            shape = handler.shape(graph, base, who)
            dw = sum(method_named(e["method"]).dense({k: graph.tensor(n.target) for k, n in nodes.items()}, shape)
                     for e, nodes in adapters)
            handler.restore(graph, base, rec.originals(), dw)
        for entry, nodes in adapters:
            meta = {k: v for k, v in entry["meta"].items() if k != "method"}
            attach(graph, base, entry["name"], method_named(entry["method"]), nodes, meta)
            restored.append(f"{path}:{entry['name']}")
        refresh_reads(base)
        graph.gm.graph.erase_node(rec.node)
    return PassResult(graph, True, {"unfolded": len(restored), "adapters": restored})
