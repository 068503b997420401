"""``adapter.ia3``: learned per-channel rescaling of activations.

IA3 (https://arxiv.org/abs/2205.05638) as PEFT 0.21's ``IA3Model``: a targeted layer's output is
multiplied by a trainable vector ``l [out]`` (``y·l``, bias included), except for the layers that
``feedforward`` selects (PEFT's ``feedforward_modules``), whose *input* is: ``linear(x·l, W, b)``
with ``l [in]``. ``l`` starts at 1 (PEFT's ``init_ia3_weights=True``), so outputs start unchanged;
``init=random`` draws N(0, 1) as PEFT's ``init_ia3_weights=False``. In the graph both forms
recompute the layer as PEFT does, so the two agree bit for bit: ``splice::ia3_scale(y, l, scale) = y·l``
and ``splice::ia3_ff_linear(y, x, W, b, l, scale) = linear(x·l, W, b)`` (it reads the float base
weight); the result replaces the base output ``y`` (one IA3 adapter per layer, where PEFT multiplies
several). ``scale`` is the adapter's weight: ``l`` becomes ``l·scale + 1 - scale`` (0 = off). Folding is exact:
``W' = diag(l) W``, ``b' = l·b`` (output) or ``W' = W diag(l)`` (input). PEFT stores ``l`` as
``ia3_l`` ``[out, 1]`` / ``[1, in]``; splice as a vector. PEFT's per-architecture default targets
are not reproduced: name ``targets`` and ``feedforward`` (a targets expression) explicitly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.select import select_nodes, validate_targets
from splice.kernels.adapters.base_deltas import mix
from splice.passes.adapters._base import float_base
from splice.passes.adapters._common import (
    ADAPTER_REPORT,
    AdapterConfig,
    Method,
    attach,
    layer_path,
    register_method,
)
from splice.passes.adapters._inject import Layer, inject
from splice.passes.adapters._peft import PeftLoad, base_config, register_peft_format
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class IA3Config(AdapterConfig):
    """IA3 adapter (PEFT-compatible): rescale outputs, or inputs of the feedforward layers."""

    feedforward: str = field(default="", metadata={
        "help": "targets expression of the layers whose input is scaled (PEFT feedforward_modules); empty = none"})
    init: Literal["default", "random"] = field(default="default", metadata={
        "help": "default: l = 1 (outputs unchanged); random: l ~ N(0, 1) (PEFT init_ia3_weights=False)"})

    def __post_init__(self):
        super().__post_init__()
        if self.feedforward:
            validate_targets(self.feedforward)


def _gain(t) -> torch.Tensor:
    """The vector the layer is scaled by, minus one."""
    return mix(t["l"].detach().float(), t["scale"].detach()) - 1


def _out_affine(t, w, b):
    g = _gain(t)
    return g[:, None] * w, None if b is None else g * b


def _in_affine(t, w, b):
    return w * _gain(t)[None, :], None


IA3 = register_method(Method("ia3", torch.ops.splice.ia3_scale.default, ("l", "scale"), ("l",), None,
                             reads=("out",), affine=_out_affine, recomputes=True))
IA3_FF = register_method(Method("ia3_ff", torch.ops.splice.ia3_ff_linear.default, ("l", "scale"), ("l",), None,
                                reads=("out", "x", "weight", "bias"), affine=_in_affine, recomputes=True))


@register_pass("adapter.ia3", IA3Config, reference="https://arxiv.org/abs/2205.05638", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def ia3(graph: Graph, cfg: IA3Config, ctx: PassContext) -> PassResult:
    who = "adapter.ia3"
    chosen = select_nodes(graph.gm, cfg.targets, ("linear",), who)
    ff = select_nodes(graph.gm, cfg.feedforward, ("linear",), who) if cfg.feedforward else []
    stray = [n for n in ff if n not in chosen]
    if stray:
        raise ConfigError(f"{who}: feedforward layer '{layer_path(stray[0])}' is not among the targets "
                          "(PEFT: feedforward_modules must be a subset of target_modules)")
    gen = ctx.generator()

    def vector(n: int) -> dict:
        return {"l": torch.randn(n, generator=gen) if cfg.init == "random" else torch.ones(n)}

    def make_ff(layer: Layer) -> dict:
        float_base(graph, layer.node, who, "IA3 (feedforward)")
        return vector(layer.in_f)

    meta = {"init": cfg.init, "scaling": 1.0}
    report = {"adapter": cfg.name, "layers": 0, "trainable_params": 0}
    outputs = [n for n in chosen if n not in ff]
    for method, nodes, build in ((IA3, outputs, lambda layer: vector(layer.out_f)), (IA3_FF, ff, make_ff)):
        if nodes:
            part = inject(graph, cfg, who, method, ("linear",), build, meta, nodes).report
            report["layers"] += part["layers"]
            report["trainable_params"] += part["trainable_params"]
    report["feedforward_layers"] = len(ff)
    return PassResult(graph, True, report)


# ------------------------------------------------------------------------ PEFT mapping
IA3_KEY = re.compile(r"(?P<path>.+)\.(?P<key>ia3_l)(?:\.[A-Za-z0-9_]+)?")


def _is_feedforward(config: dict, path: str) -> bool:
    """PEFT's ``feedforward_modules`` test: a regex (full match) or a list of name endings."""
    spec = config.get("feedforward_modules") or []
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(s) for s in spec)


def load_ia3(job: PeftLoad) -> None:
    if job.config.get("modules_to_save"):
        raise job.error("modules_to_save (fully trained tensors) is not supported yet")
    meta = {"init": "peft", "scaling": 1.0, "weight": 1.0, "active": True, "source": str(job.path)}
    for mod, parts in job.modules(IA3_KEY, "IA3 ia3_l").items():
        key, value = parts["ia3_l"]
        nodes = job.layers(mod, key)
        out_f, in_f = job.shape(nodes[0])
        lp = job.claim(nodes[0])
        ff = _is_feedforward(job.config, mod)
        want = (1, in_f) if ff else (out_f, 1)
        if tuple(value.shape) != want:
            raise ConfigError(f"adapter.peft: {key} has shape {list(value.shape)}, expected {list(want)} for '{lp}'")
        if ff:
            float_base(job.graph, nodes[0], "adapter.peft", "IA3 (feedforward)")
        tensors = {"l": value.float().reshape(-1).contiguous(), "scale": torch.tensor(1.0)}
        for node in nodes:
            tensors = attach(job.graph, node, job.name, IA3_FF if ff else IA3, tensors, meta)


def save_ia3(graph: Graph, chosen: list) -> tuple[dict, dict]:
    """``l`` with the adapter's weight folded in (``l·weight + 1 - weight``, exact at weight 1), PEFT's shapes."""
    weights, ff = {}, []
    for s in chosen:
        t = s.tensors(graph)
        l_eff = mix(t["l"].detach().float(), t["scale"].detach())
        is_ff = s.method is IA3_FF
        weights[f"base_model.model.{s.path}.ia3_l"] = (l_eff[None, :] if is_ff else l_eff[:, None]).contiguous()
        ff += [s.path] if is_ff else []
    config = {**base_config("IA3", graph, [s.path for s in chosen]), "feedforward_modules": sorted(ff),
              "fan_in_fan_out": False, "init_ia3_weights": True}
    return config, weights


register_peft_format("IA3", load=load_ia3, save=save_ia3, methods=("ia3", "ia3_ff"))
