"""The pass contract: a frozen typed config, a pure function, an explicit registry.

A pass is ``fn(graph, cfg, ctx) -> PassResult``. ``run_pass`` hands ``fn`` a private
structural copy of the input graph (tensors shared by reference), so a pass may edit
that copy's nodes freely and the caller's graph never changes.

Besides its config a pass declares (``register_pass``) what the Pipeline checks before
running anything: ``requires`` (passes, or capabilities other passes ``provides``, that must
come earlier in the pipeline or in the graph's history), ``graphs`` (other graphs it reads from
``PassContext.graphs``), ``needs_calibration``; and what tools read: ``report_fields`` (report
keys worth showing, with a short description) and ``applies`` (the models it applies to).
``version`` is compared with every history entry by :func:`check_history`; a pass that can
read its older entries registers ``migrate(entry) -> entry`` (the entry at the current version).
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
from splice.ir.select import op_kind
from splice.passes.analysis import AnalysisCache


ECHO = 80  # at most this many characters of user input in an error message


class PassVersionError(ConfigError):
    """A history entry was recorded by another version of its pass."""


def clip(text: str) -> str:
    """``text`` cut to ``ECHO`` characters (user input quoted in an error)."""
    return text if len(text) <= ECHO else text[:ECHO] + f"… ({len(text)} chars)"


def echo(value: Any) -> str:
    """``repr(value)`` cut to ``ECHO`` characters."""
    return clip(repr(value))


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
        raise ValueError(f"{name} expects {typ}, got {echo(raw)}")
    if origin is typing.Literal:
        if raw not in args:
            raise ValueError(f"{name} must be one of {', '.join(map(str, args))}, got {echo(raw)}")
        return raw
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} expects true/false, got {echo(raw)}")
    if typ is int:
        if isinstance(raw, bool):
            raise ValueError(f"{name} expects an integer, got {echo(raw)}")
        try:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} expects an integer, got {echo(raw)}") from None
    if typ is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} expects a number, got {echo(raw)}") from None
    if typ is str:
        return str(raw)
    return raw


@dataclass
class PassResult:
    """What a pass returns. ``modified=False`` says the graph computes what it did before
    (the Pipeline records it and its instruments skip their checks)."""

    graph: Any  # splice.ir.graph.Graph
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the graph: calibration batches, named further calibration sets
    (``datasets``: D-Pruner's ``general`` set beside the domain calibration), other graphs by name
    (``graphs``: merging's inputs, extraction's ``source``), the export ``target`` the
    pipeline compiles for (``"onnx"``, ``"cpu"``; recorded in the history), a seeded RNG and the
    ``cache`` of shared analyses (``splice.passes.analysis``)."""

    calibration: list[tuple[torch.Tensor, ...]] | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = False
    graphs: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, list[tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    target: str | None = None
    cache: AnalysisCache = field(default_factory=AnalysisCache)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class Applies:
    """Where a pass applies: graphs with an op of one of ``kinds`` (``ir.select`` kinds) and,
    if given, for which ``check(graph)`` holds; ``description`` says it in words."""

    description: str
    kinds: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None

    def __call__(self, graph) -> bool:
        if self.kinds and not any(op_kind(n) in self.kinds for n in graph.gm.graph.nodes):
            return False
        return self.check is None or bool(self.check(graph))


@dataclass(frozen=True)
class PassInfo:
    name: str
    config_cls: type[PassConfig]
    fn: Callable[..., PassResult]
    reference: str
    needs_calibration: bool | Callable[[PassConfig], bool]  # or: whether a config needs it (by its options)
    version: int
    requires: tuple[str, ...] = ()  # passes or capabilities needed earlier (adapter.fold: "adapter")
    provides: tuple[str, ...] = ()  # capabilities it gives later passes, besides its own name
    graphs: tuple[str, ...] = ()  # other graphs it reads from ctx.graphs (adapter.extract: "source")
    datasets: tuple[str, ...] = ()  # calibration sets it reads from ctx.datasets (prune.dpruner: "general")
    report_fields: dict[str, str] = field(default_factory=dict)  # report key -> short description/unit
    applies: Applies | None = None  # None: every graph
    migrate: Callable[[dict], dict] | None = None  # an older history entry -> the current version's

    @property
    def summary(self) -> str:
        doc = (self.config_cls.__doc__ or self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def calibrated(self, cfg: PassConfig) -> bool:
        """Whether the pass needs calibration data with ``cfg``."""
        return bool(self.needs_calibration(cfg) if callable(self.needs_calibration) else self.needs_calibration)

    def applies_to(self, graph) -> bool:
        return self.applies is None or self.applies(graph)

    def graph_option(self, name: str) -> str | None:
        """The help of the config option that names graph ``name`` by path, if there is one."""
        for f in self.config_cls.options():
            if f.name == name:
                return f.metadata.get("help", "a path")
        return None

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
                raise ConfigError(f"{self.name}: unknown option '{clip(str(key))}'{more}")
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
                  needs_calibration: bool | Callable[[PassConfig], bool] = False, version: int = 1, requires: tuple[str, ...] = (),
                  provides: tuple[str, ...] = (), graphs: tuple[str, ...] = (), datasets: tuple[str, ...] = (),
                  report_fields: dict[str, str] | None = None, applies: Applies | None = None,
                  migrate: Callable[[dict], dict] | None = None):
    """Register ``fn`` as pass ``name``; a duplicate name is an error (see the module doc)."""

    def deco(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"pass {name!r} is registered twice")
        if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
            raise TypeError(f"{name}: config must be a frozen dataclass")
        _REGISTRY[name] = PassInfo(name, config_cls, fn, reference, needs_calibration, version, tuple(requires),
                                   tuple(provides), tuple(graphs), tuple(datasets), dict(report_fields or {}),
                                   applies, migrate)
        return fn

    return deco


def get_pass(name: str) -> PassInfo:
    """A registered pass. (Importing this module imports the package ``splice.passes`` first,
    whose ``__init__`` imports every family, so the built-in passes are always registered.)"""
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        more = f"; did you mean '{hint[0]}'?" if hint else "; see `splice passes`"
        raise ConfigError(f"unknown pass '{clip(name)}'{more}")
    return _REGISTRY[name]


def list_passes() -> list[PassInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def providers(requirement: str) -> list[str]:
    """Registered passes that satisfy ``requirement`` (a pass name or a capability), sorted."""
    return [i.name for i in list_passes() if requirement == i.name or requirement in i.provides]


def check_history(graph) -> None:
    """Each history entry of a registered pass must carry that pass's current version, or be
    migrated by the pass's ``migrate`` hook (entries are replaced by the migrated ones);
    entries of passes this process does not know (``train``, user passes) are left alone."""
    history = list(graph.history)
    for i, entry in enumerate(history):
        info = _registered(entry)
        if info is not None and entry.get("version", info.version) != info.version:
            history[i] = migrate_entry(info, entry)
    graph.history = history


def migrate_entry(info: PassInfo, entry: dict) -> dict:
    """``entry`` (of ``info``'s pass) at ``info.version``, or a one-line error naming both versions."""
    got = entry.get("version")
    if info.migrate is not None and isinstance(got, int) and got < info.version:
        new = info.migrate(dict(entry))
        if new.get("version") == info.version:
            return new
    raise PassVersionError(f"{info.name}: recorded at version {got!r}, but this splice has version {info.version} "
                           "(no migration; re-run the pass on the source model)")


def _registered(entry: Any) -> PassInfo | None:
    """The registered pass of a history entry, if any."""
    return _REGISTRY.get(entry.get("pass")) if isinstance(entry, dict) else None


def report_summary(entry: dict) -> dict[str, Any]:
    """The declared report fields of a history entry's pass that its report holds, as
    ``{description: value}`` (what ``splice inspect`` shows for any family)."""
    info, report = _registered(entry), entry.get("report") or {}
    if info is None:
        return {}
    return {desc: report[key] for key, desc in info.report_fields.items() if key in report}


def config_to_json(name: str, cfg: PassConfig) -> str:
    return json.dumps({"pass": name, "config": cfg.to_dict()}, sort_keys=True)


def config_from_json(text: str) -> tuple[PassInfo, PassConfig]:
    data = json.loads(text)
    info = get_pass(data["pass"])
    return info, info.make_config(data.get("config", {}))
