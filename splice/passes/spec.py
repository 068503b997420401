"""Pipeline specs: ``name:key=value,...`` strings and YAML recipe files <-> pass configs.

A recipe file is YAML with a ``passes`` list; each item is a spec string, a mapping
``{name: {option: value}}``, or a history entry ``{pass: NAME, config: {...}, version: N}`` (so an
artifact's ``manifest.json``, whose ``passes`` are its history, replays as a recipe; the version
must match the registered pass's, or the pass must migrate it)::

    passes:
      - quantize.rtn:bits=4,group_size=32
      - quantize.rtn: {bits: 8, targets: embedding}

Recipes are read without YAML aliases or anchors (a few lines of aliases expand to gigabytes),
and an error quotes at most ``base.ECHO`` characters of what the user wrote.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from splice.errors import ConfigError, SpliceError
from splice.passes.base import PassConfig, PassInfo, clip, echo, get_pass, migrate_entry


def parse_spec(spec: str) -> tuple[PassInfo, PassConfig]:
    """``quantize.rtn:bits=4,group_size=64`` -> (PassInfo, validated config)."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise ConfigError(f"empty pass spec {echo(spec)}")
    info = get_pass(name.strip())
    options: dict[str, str] = {}
    last = None
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq and last is not None:  # a list value: quantize.allocate:bits=2,3,4
            options[last] += "," + item
            continue
        if not eq or not key.strip():
            raise ConfigError(f"{info.name}: expected key=value, got {echo(item)}")
        last = key.strip()
        if last in options:
            raise ConfigError(f"{info.name}: option '{clip(last)}' is given twice")
        options[last] = value.strip()
    return info, info.make_config(options)


def format_spec(info: PassInfo, cfg: PassConfig) -> str:
    """The inverse of :func:`parse_spec`, listing only non-default options."""
    defaults = info.config_cls()
    items = [f"{k}={_fmt(v)}" for k, v in cfg.to_dict().items() if getattr(defaults, k) != v]
    return info.name + (":" + ",".join(items) if items else "")


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def load_recipe(path: str | Path) -> list[tuple[PassInfo, PassConfig]]:
    """Read a YAML recipe; syntax errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        raise SpliceError(f"recipe {path}: is a directory (give the YAML file)")
    if not path.is_file():
        raise SpliceError(f"recipe {path}: no such file")
    try:
        data = yaml.load(path.read_text(), Loader=_NoAliasLoader)
    except _AliasError as e:
        raise SpliceError(f"recipe {path}:{e.line}: YAML aliases and anchors are not allowed in a recipe") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise SpliceError(f"recipe {path}{line}: YAML syntax error: {clip(str(e.problem or e.context))}") from None
    except yaml.YAMLError as e:
        raise SpliceError(f"recipe {path}: YAML error: {clip(str(e).splitlines()[0])}") from None
    items = data.get("passes") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise SpliceError(f"recipe {path}: expected a 'passes' list")
    out = []
    for i, item in enumerate(items, 1):
        try:
            out.append(_recipe_item(item))
        except ConfigError as e:
            raise type(e)(f"recipe {path}, pass #{i}: {e}") from None
    return out


def _recipe_item(item: Any) -> tuple[PassInfo, PassConfig]:
    if isinstance(item, str):
        return parse_spec(item)
    if isinstance(item, dict) and "pass" in item:  # a history entry: replayed at its version
        info = get_pass(str(item["pass"]))
        entry = migrate_entry(info, item) if item.get("version", info.version) != info.version else item
        return info, info.make_config(_mapping(info, entry.get("config")))
    if isinstance(item, dict) and len(item) == 1:
        (name, options), = item.items()
        info = get_pass(str(name))
        return info, info.make_config(_mapping(info, options))
    raise ConfigError(f"expected 'name:k=v,...' or {{name: {{k: v}}}}, got {echo(item)}")


def _mapping(info: PassInfo, options: Any) -> dict:
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"{info.name}: options must be a mapping, got {echo(options)}")
    return options or {}


class _AliasError(yaml.YAMLError):
    def __init__(self, line: int):
        super().__init__(f"line {line}: alias")
        self.line = line


class _NoAliasLoader(yaml.SafeLoader):
    """``SafeLoader`` refusing anchors and aliases as soon as it meets one (before any expansion)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AliasError(event.start_mark.line + 1)
        return super().compose_node(parent, index)
