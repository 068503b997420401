"""Pipeline specs: ``name:key=value,...`` strings and YAML recipe files <-> pass configs.

A recipe file is YAML with a ``passes`` list; each item is a spec string or a mapping
``{name: {option: value}}``::

    passes:
      - quantize.rtn:bits=4,group_size=32
      - quantize.rtn: {bits: 8, targets: embedding}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from splice.errors import ConfigError, SpliceError
from splice.passes.base import PassConfig, PassInfo, get_pass


def parse_spec(spec: str) -> tuple[PassInfo, PassConfig]:
    """``quantize.rtn:bits=4,group_size=64`` -> (PassInfo, validated config)."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise ConfigError(f"empty pass spec {spec!r}")
    info = get_pass(name.strip())
    options: dict[str, str] = {}
    last = None
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq and last is not None:  # a list value: quantize.allocate:bits=2,3,4
            options[last] += "," + item
            continue
        if not eq or not key.strip():
            raise ConfigError(f"{info.name}: expected key=value, got {item!r}")
        last = key.strip()
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
    if not path.is_file():
        raise SpliceError(f"recipe {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise SpliceError(f"recipe {path}{line}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SpliceError(f"recipe {path}: YAML error: {str(e).splitlines()[0]}") from None
    items = data.get("passes") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise SpliceError(f"recipe {path}: expected a 'passes' list")
    out = []
    for i, item in enumerate(items, 1):
        try:
            out.append(_recipe_item(item))
        except ConfigError as e:
            raise ConfigError(f"recipe {path}, pass #{i}: {e}") from None
    return out


def _recipe_item(item: Any) -> tuple[PassInfo, PassConfig]:
    if isinstance(item, str):
        return parse_spec(item)
    if isinstance(item, dict) and len(item) == 1:
        (name, options), = item.items()
        info = get_pass(str(name))
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{info.name}: options must be a mapping, got {options!r}")
        return info, info.make_config(options or {})
    raise ConfigError(f"expected 'name:k=v,...' or {{name: {{k: v}}}}, got {item!r}")
