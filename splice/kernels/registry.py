"""The op registry: one record per splice custom op, written by the family that defines it.

A record says what the rest of splice needs to know about an op without importing its family:
its kind for target selection (``linear`` / ``embedding`` / ``conv`` / None), the role of each
stored-tensor argument (for sizes and artifacts), whether its stored tensors train, sample
inputs for the op tests, the reference implementation, how its weight reads as a dense float
tensor and takes a new one (``WeightAccess``), and one translation per backend, named as
``"module:function"`` and imported only when a backend asks (so ``import splice.kernels…`` never
loads onnxscript, onnx or triton).

The families register their ops when imported (``splice.kernels.families`` imports them all);
``ir`` reads kinds, roles and weight access from here, exporters read ``translations(backend)``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.errors import SpliceError

ONNX_OPSET = 21  # the default opset every ONNX translation is written for
BACKENDS = ("onnx", "triton")  # the backends a translation may be declared for (columns of docs/backends.md)


@dataclass(frozen=True)
class WeightAccess:
    """How an op's stored weight reads as a dense float tensor and takes a new one.

    ``args``: ``{position: name}`` of the stored tensors the weight is kept in (the names fold
    records keep, e.g. ``qweight``, ``scales``, ``qzeros``). ``read(args)``:
    the op's arguments (stored tensors in place of their nodes) -> dense float weight (``[out, in]``
    for a linear). ``write(args, dense)`` -> ``{position: new tensor or None}`` for the positions in
    ``args``: the dense weight put back on the op's own format (re-quantized on the same grid,
    masked, or as is).
    """

    args: dict[int, str]
    read: Callable[[tuple], torch.Tensor]
    write: Callable[[tuple, torch.Tensor], dict[int, torch.Tensor | None]]
    lossy: bool = False  # True when ``write`` rounds (re-quantizes): callers keep the originals for an exact undo


@dataclass(frozen=True)
class OpRecord:
    """Everything splice knows about one custom op (see the module docstring)."""

    name: str
    family: str
    reference: Callable[..., Any]
    kind: str | None = None
    roles: dict[int, str] = field(default_factory=dict)
    trainable: bool = False
    sample_inputs: Callable[[], tuple] | None = None
    translations: dict[str, str] = field(default_factory=dict)
    weight: WeightAccess | None = None

    @property
    def op(self) -> torch._ops.OpOverload:
        namespace, name = self.name.split("::")
        return getattr(getattr(torch.ops, namespace), name).default

    def translation(self, backend: str) -> Callable[..., Any] | None:
        """The backend's translation function, imported now (None when the op declares none)."""
        where = self.translations.get(backend)
        if where is None:
            return None
        module, _, function = where.partition(":")
        return getattr(importlib.import_module(module), function)


_RECORDS: dict[str, OpRecord] = {}
KINDS = ("linear", "conv", "embedding")


def register_op(op_def, *, family: str, kind: str | None = None, roles: dict[int, str] | None = None,
                trainable: bool = False, sample_inputs: Callable[[], tuple] | None = None,
                translations: dict[str, str] | None = None, weight: WeightAccess | None = None) -> OpRecord:
    """Record the custom op ``op_def`` (what ``torch.library.custom_op`` returned) of ``family``."""
    name = f"{op_def._namespace}::{op_def._name}"
    if name in _RECORDS:
        raise SpliceError(f"op registry: {name} is registered twice")
    if kind is not None and kind not in KINDS:
        raise SpliceError(f"op registry: {name} has unknown kind {kind!r} (one of {', '.join(KINDS)})")
    unknown = set(translations or {}) - set(BACKENDS)
    if unknown:
        raise SpliceError(f"op registry: {name} declares unknown backend(s) {', '.join(sorted(unknown))}")
    rec = OpRecord(name, family, op_def._init_fn, kind, dict(roles or {}), trainable, sample_inputs,
                   dict(translations or {}), weight)
    _RECORDS[name] = rec
    return rec


def op_name(op) -> str:
    """``splice::qlinear`` for ``torch.ops.splice.qlinear.default``."""
    return f"{op.namespace}::{op._opname}"


def record(op) -> OpRecord | None:
    """The record of an ``OpOverload`` (None for ATen ops and unregistered ones)."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    return _RECORDS.get(op_name(op))


def records() -> list[OpRecord]:
    """Every registered op, by family then name."""
    return sorted(_RECORDS.values(), key=lambda r: (r.family, r.name))


def translations(backend: str) -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """``{op: translation}`` of every op that declares one for ``backend`` (imports them now)."""
    return {rec.op: rec.translation(backend) for rec in records() if backend in rec.translations}


def missing_translations(backend: str, ops) -> list[torch._ops.OpOverload]:
    """The custom (non-ATen, non-prims) ops among ``ops`` with no ``backend`` translation, once each."""
    missing = []
    for op in ops:
        if not isinstance(op, torch._ops.OpOverload) or op.namespace in ("aten", "prims") or op in missing:
            continue
        rec = record(op)
        if rec is None or backend not in rec.translations:
            missing.append(op)
    return missing


def backends_markdown() -> str:
    """``docs/backends.md``: the op x backend table of every registered op."""
    head = ["op", "family", "kind", "trainable", "weight", *BACKENDS]
    lines = ["# Ops and backends", "",
             "Generated by `python -m splice.kernels` from the op registry (`splice/kernels/registry.py`);",
             "a test checks that this file is current. `weight`: the op declares how its stored weight reads",
             "as a dense tensor and takes a new one (adapter folding, masks, merging work on it).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records():
        cells = [f"`{rec.name}`", rec.family, rec.kind or "-", "yes" if rec.trainable else "no",
                 ("lossy" if rec.weight.lossy else "exact") if rec.weight else "-",
                 *("yes" if b in rec.translations else "-" for b in BACKENDS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
