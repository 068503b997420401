"""The pass contract: a frozen typed config, a pure function, an explicit registry.

A pass is ``fn(graph, cfg, ctx) -> PassResult``. ``run_pass`` hands ``fn`` a private
structural copy of the input graph (tensors shared by reference), so a pass may edit
that copy's nodes freely and the caller's graph never changes.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from splice.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Base of every pass config. Subclasses add typed fields with defaults and validate
    them in ``__post_init__`` by raising ``ValueError("option ...")``; the registry adds
    the pass name to the message."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)


def _coerce(name: str, typ: Any, raw: Any) -> Any:
    """Convert a CLI/JSON value to the option's declared type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, a, raw)
            except ValueError:
                continue
        raise ValueError(f"{name} expects {typ}, got {raw!r}")
    if origin is typing.Literal:
        if raw not in args:
            raise ValueError(f"{name} must be one of {', '.join(map(str, args))}, got {raw!r}")
        return raw
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} expects true/false, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool):
            raise ValueError(f"{name} expects an integer, got {raw!r}")
        try:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} expects an integer, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} expects a number, got {raw!r}") from None
    if typ is str:
        return str(raw)
    return raw


@dataclass
class PassResult:
    graph: Any  # splice.ir.graph.Graph
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the graph: calibration batches, device, a seeded RNG."""

    calibration: list[tuple[torch.Tensor, ...]] | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = False

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class PassInfo:
    name: str
    config_cls: type[PassConfig]
    fn: Callable[..., PassResult]
    reference: str
    needs_calibration: bool
    version: int
    requires: tuple[str, ...] = ()  # passes a graph needs first (adapter.fold needs an adapter)

    @property
    def summary(self) -> str:
        doc = (self.config_cls.__doc__ or self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def make_config(self, options: dict[str, Any] | None = None) -> PassConfig:
        """Build a validated config from raw (string or JSON) option values."""
        options = dict(options or {})
        types_ = self.config_cls.option_types()
        known = [f.name for f in self.config_cls.options()]
        kwargs = {}
        for key, raw in options.items():
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                more = f"; did you mean '{hint[0]}'?" if hint else f" (options: {', '.join(known) or 'none'})"
                raise ConfigError(f"{self.name}: unknown option '{key}'{more}")
            try:
                kwargs[key] = _coerce(key, types_[key], raw)
            except ValueError as e:
                raise ConfigError(f"{self.name}: {e}") from None
        try:
            return self.config_cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{self.name}: {e}") from None


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, config_cls: type[PassConfig], *, reference: str,
                  needs_calibration: bool = False, version: int = 1, requires: tuple[str, ...] = ()):
    """Register ``fn`` as pass ``name``; a duplicate name is an error."""

    def deco(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"pass {name!r} is registered twice")
        if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
            raise TypeError(f"{name}: config must be a frozen dataclass")
        _REGISTRY[name] = PassInfo(name, config_cls, fn, reference, needs_calibration, version, tuple(requires))
        return fn

    return deco


def _load_builtin_passes() -> None:
    import splice.passes  # noqa: F401  (imports every family, which registers its passes)


def get_pass(name: str) -> PassInfo:
    _load_builtin_passes()
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        more = f"; did you mean '{hint[0]}'?" if hint else "; see `splice passes`"
        raise ConfigError(f"unknown pass '{name}'{more}")
    return _REGISTRY[name]


def list_passes() -> list[PassInfo]:
    _load_builtin_passes()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def config_to_json(name: str, cfg: PassConfig) -> str:
    return json.dumps({"pass": name, "config": cfg.to_dict()}, sort_keys=True)


def config_from_json(text: str) -> tuple[PassInfo, PassConfig]:
    data = json.loads(text)
    info = get_pass(data["pass"])
    return info, info.make_config(data.get("config", {}))
