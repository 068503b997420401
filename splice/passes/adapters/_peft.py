"""PEFT directory formats: the registry ``splice.load_peft`` / ``save_peft`` dispatch on.

A PEFT directory is ``adapter_config.json`` (with ``peft_type``) plus ``adapter_model.safetensors``
(keys ``base_model.model.<module path>.<tensor>``). Each adapter kind that PEFT has registers how it
maps, in its own module::

    register_peft_format("LORA", load=load_lora, save=save_lora, methods=("lora",),
                         accepts=lambda cfg: not cfg.get("use_dora"))

Contract:

* ``peft_type`` is the config's ``peft_type``. Several formats may share one (LoRA and DoRA are
  both ``LORA``); ``adapter.peft`` takes the first whose ``accepts(config)`` is true.
* ``load(job: PeftLoad) -> None`` attaches the adapter to ``job.graph`` (already a copy, finalized
  by the caller) under ``job.name``. ``PeftLoad`` carries the config and the tensors as saved and
  the helpers every format needs: ``modules(regex)`` groups the tensor keys by module path (a key
  that matches no format regex is an error), ``layers(path, key)`` finds the linear op(s) of a
  PEFT module path, ``claim(node)`` refuses a second adapter of the same name on a layer,
  ``shape(node)`` is the layer's ``(out, in)``, ``option(pattern_key, path, default_key)`` reads a
  per-layer override (``rank_pattern``/``alpha_pattern``) the way PEFT matches them, and
  ``error(msg)`` builds the one-line ``ConfigError("adapter.peft: <dir>: msg")``.
* ``save(graph, sites) -> (config, tensors)``: ``sites`` are the unfolded sites of one adapter
  name, every one of a method in ``methods``; the result is the ``adapter_config.json`` dict and
  the safetensors dict (PEFT key names). ``save_peft`` writes both atomically. Raise
  ``ConfigError("save_peft: ...")`` for what PEFT cannot represent.
* Unknown config options that change the computation must be refused by ``load`` with an error
  that names the option (a silently different adapter is worse than none).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.passes.adapters._base import base_op
from splice.passes.adapters._common import Site, layer_path

PREFIX = "base_model.model."


@dataclass
class PeftLoad:
    """One ``adapter.peft`` load: what a format's ``load`` reads and the helpers it shares."""

    graph: Graph
    name: str
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    taken: set[tuple[str, str]]
    _layers: dict[str, list[fx.Node]] = field(default_factory=dict)

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"adapter.peft: {self.path}: {message}")

    def modules(self, pattern: re.Pattern, what: str) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
        """``{module path: {group 'key': (full key, tensor)}}`` for ``pattern`` (named groups
        ``path`` and ``key``, matched after the ``base_model.model.`` prefix)."""
        out: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        for key, value in self.tensors.items():
            m = pattern.fullmatch(key.removeprefix(PREFIX))
            if m is None:
                raise self.error(f"tensor '{key}' is not a {what} weight (unsupported)")
            out.setdefault(m["path"], {})[m["key"]] = (key, value)
        return out

    def layers(self, path: str, key: str) -> list[fx.Node]:
        if not self._layers:
            for node in self.graph.nodes("linear"):
                self._layers.setdefault(layer_path(node), []).append(node)
        if path in self._layers:
            return self._layers[path]
        near = [p for p in self._layers if p.endswith("." + path) or path.endswith("." + p)]
        if len(near) != 1:
            raise ConfigError(f"adapter.peft: {key}: no linear layer '{path}' in the graph (an adapter for another base?)")
        return self._layers[near[0]]

    def claim(self, node: fx.Node) -> str:
        """The layer's path, after checking it has no adapter named ``self.name`` yet."""
        lp = layer_path(node)
        if (lp, self.name) in self.taken:
            raise ConfigError(f"adapter.peft: layer '{lp}' already has an adapter named '{self.name}'; pass another name=")
        self.taken.add((lp, self.name))
        return lp

    def shape(self, node: fx.Node) -> tuple[int, int]:
        return base_op(node, "adapter.peft").shape(self.graph, node, "adapter.peft")

    def option(self, pattern_key: str, path: str, default_key: str, default):
        """A per-layer value from ``config[pattern_key]`` (PEFT's suffix match) or the default."""
        for pattern, value in (self.config.get(pattern_key) or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", path):
                return value
        return self.config.get(default_key, default)

    def refuse(self, options: dict[str, str]) -> None:
        """Refuse set config options this format cannot represent (``{option: description}``)."""
        for key, what in options.items():
            if self.config.get(key):
                raise self.error(f"{what} is not supported yet")


@dataclass(frozen=True)
class PeftFormat:
    peft_type: str
    load: Callable[[PeftLoad], None]
    save: Callable[[Graph, list[Site]], tuple[dict, dict[str, torch.Tensor]]]
    methods: tuple[str, ...]
    accepts: Callable[[dict], bool]


FORMATS: list[PeftFormat] = []


def register_peft_format(peft_type: str, *, load, save, methods: tuple[str, ...],
                         accepts: Callable[[dict], bool] = lambda cfg: True) -> PeftFormat:
    fmt = PeftFormat(peft_type, load, save, tuple(methods), accepts)
    FORMATS.append(fmt)
    return fmt


def format_for_config(cfg: dict, path: Path) -> PeftFormat:
    kind = cfg.get("peft_type")
    same = [f for f in FORMATS if f.peft_type == kind]
    if not same:
        known = ", ".join(sorted({f.peft_type for f in FORMATS}))
        raise ConfigError(f"adapter.peft: {path}: peft_type '{kind}' is not supported (supported: {known})")
    for fmt in same:
        if fmt.accepts(cfg):
            return fmt
    raise ConfigError(f"adapter.peft: {path}: this {kind} configuration is not supported")


def format_for_method(method: str, name: str, layer: str) -> PeftFormat:
    for fmt in FORMATS:
        if method in fmt.methods:
            return fmt
    raise ConfigError(f"save_peft: adapter '{name}' on '{layer}' is {method}, which has no PEFT format")


def most_common(values) -> object:
    return Counter(values).most_common(1)[0][0]


def base_config(peft_type: str, graph: Graph, layers) -> dict:
    """The fields every PEFT config has."""
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": graph.source.get("path"),
            "target_modules": sorted(layers), "inference_mode": True, "modules_to_save": None}
