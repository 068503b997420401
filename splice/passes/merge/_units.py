"""The shapes a merge pass works in, shared by ``_common.py``'s driver and ``_slices.py``: its
checked inputs, the output tensors it merges (``Unit``) and the count check of a method's inputs."""
from __future__ import annotations

from dataclasses import dataclass

from splice.errors import ConfigError
from splice.ir.graph import Graph, weights_digest


@dataclass
class Unit:
    """One output tensor to merge: ``target`` in the graph being rewritten; ``source``: input index ->
    that input's tensor; ``merged``: the inputs merged besides ``base`` (-1: none), in order;
    ``shared`` / ``own[i]``: the settings its shared / input ``i``'s parameters are read from, first
    wins; ``t``: its position for gradients."""

    target: str
    source: dict[int, str]
    merged: list[int]
    base: int
    shared: list[dict]
    own: dict[int, list[dict]]
    t: float


@dataclass
class MergeInputs:
    """A merge pass's inputs, read from its config and context and checked."""

    graphs: list[Graph]
    names: list[str]
    per_model: list[dict]
    top: dict
    sources: list[dict[str, str]]  # per input: the template's tensor target -> that input's

    def digests(self) -> list[dict]:
        return [{"name": n, "weights_sha256": weights_digest(g)} for n, g in zip(self.names, self.graphs)]


def check_inputs(method, n_inputs: int, base: int, where: str = "") -> list[int]:
    """The indices ``method`` (a ``MergeMethod``) merges besides the base; errors for a missing base or a wrong count
    (``where``: the recipe's part they are about, e.g. ``slices[1]: ``)."""
    if method.base == "required" and base < 0:
        raise ConfigError(f"merge.{method.name}: {where}needs a base model (base_model)")
    merged = [i for i in range(n_inputs) if i != base or method.base == "ignored"]
    if len(merged) < method.min_models or (method.max_models is not None and len(merged) > method.max_models):
        span = (f"exactly {method.min_models}" if method.max_models == method.min_models else
                f"at least {method.min_models}" if method.max_models is None else
                f"{method.min_models} to {method.max_models}")
        raise ConfigError(f"merge.{method.name}: {where}takes {span} model(s) besides the base, got {len(merged)}")
    return merged
