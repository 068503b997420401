"""mergekit's YAML merge recipes (``mergekit-yaml config.yaml OUT``), read into what ``splice.merge``
takes: the method, the input models (``base_model`` and ``models`` entries; ``PATH+LORA_DIR`` means
the model with that PEFT adapter folded in), top-level and per-model ``parameters`` (scalars,
gradients, ``{filter, value}`` conditionals: ``passes/merge/_common.py``), ``dtype``, ``out_dtype``
and ``tokenizer_source``. Every key is checked before any model is loaded: an unknown key, method or
parameter is a one-line error naming the file and the key, with a did-you-mean. Model paths are as
mergekit reads them: relative to the working directory.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from splice.errors import ConfigError
from splice.passes.merge._common import DTYPES, check_setting_names, get_method

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "modules", "name")
NOT_YET = ("modules", "tokenizer")  # read by mergekit, refused here with that reason


@dataclass
class Recipe:
    """A parsed recipe: ``inputs`` are model references in mergekit's order (the models, then the
    base if it is not one of them); ``base`` indexes it (-1: none)."""

    path: Path
    method: str
    inputs: list[str]
    base: int = -1
    parameters: dict[str, Any] = field(default_factory=dict)
    model_parameters: list[dict[str, Any]] = field(default_factory=list)
    model_calibration: list[str | None] = field(default_factory=list)  # splice's key: a --calib SOURCE per input
    slices: list[dict[str, Any]] = field(default_factory=list)  # sources (and a slice's base) by input index
    dtype: str = ""
    out_dtype: str = ""
    tokenizer_source: str | None = None


def _fail(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {message}")


def _reference(path: Path, key: str, value: Any) -> str:
    if isinstance(value, dict) and "model" in value:  # mergekit's expanded ModelReference
        value = value["model"] if "lora" not in value else f"{value['model']}+{value['lora']}"
    if not isinstance(value, str) or not value:
        raise _fail(path, key, f"expected a model path, got {value!r}")
    return value


def _dtype(path: Path, key: str, value: Any) -> str:
    if value is None:
        return ""
    if value not in DTYPES:
        raise _fail(path, key, f"must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def read_recipe(path: str | Path) -> Recipe:
    """Parse and check the recipe at ``path`` (module docstring)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with merge_method and models")
    for key in doc:
        if key not in TOP_KEYS:
            hint = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            raise _fail(path, str(key), "unknown key" + (f"; did you mean '{hint[0]}'?" if hint else ""))
        if key in NOT_YET:
            raise _fail(path, key, "not supported yet by splice merge (models with per-model parameters are)")
    if "merge_method" not in doc:
        raise _fail(path, "merge_method", "missing")
    method = get_method(str(doc["merge_method"]), f"{path}: merge_method")
    models = doc.get("models")
    if ("slices" in doc) == ("models" in doc):
        raise _fail(path, "models", "give exactly one of models and slices")
    recipe = Recipe(path, method.name, [], dtype=_dtype(path, "dtype", doc.get("dtype")),
                    out_dtype=_dtype(path, "out_dtype", doc.get("out_dtype")))
    if "slices" in doc:
        _read_slices(path, doc["slices"], method, recipe)
        models = []
    elif not isinstance(models, list) or not models:
        raise _fail(path, "models", "expected a list of {model: PATH, parameters: {...}}")
    recipe.parameters = _settings(path, "parameters", doc.get("parameters"), method)
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise _fail(path, key, "expected {model: PATH, parameters: {...}}")
        extra = set(entry) - {"model", "parameters", "calibration"}
        if extra:
            raise _fail(path, f"{key}.{sorted(extra)[0]}", "unknown key (model, parameters, calibration)")
        own = entry.get("calibration")
        if own is not None and not isinstance(own, str):
            raise _fail(path, f"{key}.calibration", f"expected a calibration source (as --calib takes), got {own!r}")
        recipe.inputs.append(_reference(path, f"{key}.model", entry["model"]))
        recipe.model_parameters.append(_settings(path, f"{key}.parameters", entry.get("parameters"), method))
        recipe.model_calibration.append(own)
    if doc.get("base_model") is not None:
        base = _reference(path, "base_model", doc["base_model"])
        if base not in recipe.inputs:
            recipe.inputs.append(base)
            recipe.model_parameters.append({})
            recipe.model_calibration.append(None)
        recipe.base = recipe.inputs.index(base)
    source = doc.get("tokenizer_source")
    recipe.tokenizer_source = None if source is None else str(source if source in ("base", "union")
                                                               else _reference(path, "tokenizer_source", source))
    return recipe


def _read_slices(path: Path, slices: Any, method, recipe: Recipe) -> None:
    """``slices: [{sources: [{model, layer_range: [a, b], parameters}], base_model, parameters}]`` into
    ``recipe`` (inputs in order of first mention)."""
    if not isinstance(slices, list) or not slices:
        raise _fail(path, "slices", "expected a list of {sources: [{model, layer_range}]}")

    def index(ref: str) -> int:
        if ref not in recipe.inputs:
            recipe.inputs.append(ref)
            recipe.model_parameters.append({})
            recipe.model_calibration.append(None)
        return recipe.inputs.index(ref)

    for i, sl in enumerate(slices):
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or \
                set(sl) - {"sources", "base_model", "parameters", "residual_weight"}:
            raise _fail(path, f"slices[{i}]", "expected {sources: [{model, layer_range, parameters}], base_model, "
                                              "parameters}")
        if sl.get("residual_weight") is not None:
            raise _fail(path, f"slices[{i}].residual_weight", "not supported (mergekit reads it but applies nothing)")
        sources = []
        for j, src in enumerate(sl["sources"]):
            key = f"slices[{i}].sources[{j}]"
            if not isinstance(src, dict) or set(src) - {"model", "layer_range", "parameters"}:
                raise _fail(path, key, "expected {model, layer_range, parameters}")
            ref = _reference(path, f"{key}.model", src.get("model"))
            rng = src.get("layer_range")
            if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng)):
                raise _fail(path, f"{key}.layer_range", f"expected [first, end] integers, got {rng!r}")
            sources.append({"input": index(ref), "layer_range": rng,
                            "parameters": _settings(path, f"{key}.parameters", src.get("parameters"), method)})
        entry = {"sources": sources, "parameters": _settings(path, f"slices[{i}].parameters", sl.get("parameters"),
                                                             method)}
        if sl.get("base_model") is not None:
            entry["base"] = index(_reference(path, f"slices[{i}].base_model", sl["base_model"]))
        recipe.slices.append(entry)


def _settings(path: Path, key: str, value: Any, method) -> dict:
    """A ``parameters`` mapping at ``key``, every name checked against ``method``."""
    value = value or {}
    if not isinstance(value, dict):
        raise _fail(path, key, "expected a mapping")
    check_setting_names(method, value, f"{path}: {key}")
    return value
