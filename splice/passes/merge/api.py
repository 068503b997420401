"""``splice.merge``: merge graphs from Python.

>>> merged = splice.merge([g1, g2], method="slerp", base=g1, t=0.3)
>>> merged = splice.merge([base, a, b], method="ties", base=base, density=0.5,
...                       model_parameters=[{}, {"weight": 1.0}, {"weight": 0.5}])

``parameters`` (keyword arguments) are the recipe's top-level ones, ``model_parameters`` each
input's own (mergekit's semantics: scalars, gradients over layers, ``{filter, value}`` conditionals).
``base`` is one of the graphs or another graph (then merged as an input too, as mergekit does).
``merge_recipe`` runs a mergekit YAML recipe (``recipe.py``), loading its models by path.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.passes.merge._common import get_method, model_dataset
from splice.passes.merge.recipe import Recipe, read_recipe


def merge(graphs: Sequence[Graph], method: str, base: Graph | None = None, *, model_parameters: Sequence[dict] = (),
          names: Sequence[str] = (), dtype: str = "", out_dtype: str = "", seed: int = 0, calibration=None,
          model_calibration: Sequence[list | None] = (), slices: Sequence[dict] = (), tokenizer_source=None,
          **parameters: Any) -> Graph:
    """The graph ``method`` makes of ``graphs`` (module docstring); its history records the merge
    and every input's weight digest. ``calibration``: the data-aware methods' (``fisher``,
    ``regmean``, ``ota``, ``darex``) calibration batches, run through every input;
    ``model_calibration``: each graph's own batches instead (None: the shared ones; the shared
    ones default to all of them together). ``slices`` (mergekit's layer slices, any tensor-wise
    method): ``[{"sources": [{"input": i, "layer_range": [a, b], "parameters": {...}}], "base": j,
    "parameters": {...}}]``, ``i`` and ``j`` indexing ``graphs`` (``base`` optional)."""
    from splice.passes.base import get_pass
    from splice.passes.manager import Pipeline

    get_method(method, "splice.merge")
    inputs = list(graphs)
    if not inputs:
        raise ConfigError("splice.merge: no graphs to merge")
    per_model = list(model_parameters) or [{} for _ in inputs]
    labels = list(names) or [f"model {i}" for i in range(len(inputs))]
    own = list(model_calibration) or [None for _ in inputs]
    if len(per_model) != len(inputs) or len(labels) != len(inputs) or len(own) != len(inputs):
        raise ConfigError(f"splice.merge: {len(inputs)} graphs but {len(per_model)} model_parameters / "
                          f"{len(labels)} names / {len(own)} model_calibration")
    index = -1
    if base is not None:
        index = next((i for i, g in enumerate(inputs) if g is base), -1)
        if index < 0:
            inputs, per_model, labels, index = inputs + [base], per_model + [{}], labels + ["base"], len(inputs)
            own.append(None)
    if tokenizer_source is not None:
        inputs, tokenizer_spec = _aligned(inputs, labels, index, tokenizer_source)
    spec = {"base": index, "parameters": json.dumps(parameters), "model_parameters": json.dumps(per_model),
            "names": json.dumps(labels), "dtype": dtype, "out_dtype": out_dtype, "slices": json.dumps(list(slices))}
    template = inputs[index if index >= 0 else 0]
    info = get_pass(f"merge.{method}")
    pipeline = Pipeline([(info, info.make_config(spec))])
    datasets = {model_dataset(i): data for i, data in enumerate(own) if data}
    if calibration is None and datasets:
        calibration = [batch for data in datasets.values() for batch in data]
    merged = pipeline.run(template, graphs={"inputs": inputs}, seed=seed, probe=False, calibration=calibration,
                          datasets=datasets).graph
    if tokenizer_source is not None:
        merged.source = {**merged.source, "tokenizer": tokenizer_spec}
    return merged


def _aligned(inputs: list[Graph], labels: list[str], base: int, source) -> tuple[list[Graph], dict]:
    """``inputs`` on the vocabulary of ``source`` (``merge``'s docstring) and the tokenizer spec the
    merged graph records (a union's saved to a directory removed at exit, embedded in artifacts)."""
    import atexit
    import shutil
    import tempfile

    from splice.ir.tokenizer import graph_tokenizer, load_tokenizer, tokenizer_source
    from splice.passes.merge.vocab import align_vocabularies

    who = "merge: tokenizer_source"
    tokenizers = [graph_tokenizer(g, f"{who} (input '{n}')") for g, n in zip(inputs, labels)]
    given = None
    if isinstance(source, str) and source not in ("base", "union"):
        try:
            given = load_tokenizer(source)
        except Exception as e:
            raise ConfigError(f"{who}: cannot load a tokenizer from '{source}' ({type(e).__name__})") from None
    elif isinstance(source, int) and not 0 <= source < len(inputs):
        raise ConfigError(f"{who}: input index {source} out of range (0..{len(inputs) - 1})")
    aligned, tokenizer = align_vocabularies(inputs, labels, tokenizers, base, source, given)
    if source == "union":
        folder = tempfile.mkdtemp(prefix="splice-tokenizer-")
        atexit.register(shutil.rmtree, folder, True)
        tokenizer.save_pretrained(folder)
        return aligned, tokenizer_source(folder, embedded=True)
    if given is not None:
        return aligned, tokenizer_source(source)
    chosen = source if isinstance(source, int) else max(base, 0)
    return aligned, dict(inputs[chosen].source["tokenizer"])


def load_reference(reference: str, who: str = "merge") -> Graph:
    """A recipe's model: an HF directory, artifact or ``.pt2``; ``PATH+LORA_DIR``: with that PEFT
    adapter folded in (mergekit's syntax)."""
    from pathlib import Path

    from splice.passes.manager import _LOADER, Pipeline

    path, _, lora = reference.partition("+")
    for p in (path, lora):
        if p and not Path(p).exists():
            raise ConfigError(f"{who}: model '{p}': no such file or directory")
    if not _LOADER:
        raise ConfigError(f"{who}: no model loader here; use splice.merge with loaded graphs")
    graph = _LOADER[0](path)
    if lora:
        graph = Pipeline([f"adapter.peft:path={lora}", "adapter.fold"]).run(graph, probe=False).graph
    return graph


def merge_recipe(recipe: str | Recipe, *, seed: int = 0, load=None, calibrate=None) -> Graph:
    """Run a mergekit YAML recipe (a path, or one ``read_recipe`` parsed); ``load(reference)``
    loads each model (default: ``load_reference``); ``calibrate(graph, source)`` makes the
    calibration batches of a data-aware method for ``graph`` from a model's own ``calibration``
    source, or with ``source=None`` the shared ones (the template's; None when there are none)."""
    recipe = read_recipe(recipe) if not isinstance(recipe, Recipe) else recipe
    graphs = [(load or load_reference)(ref) for ref in recipe.inputs]
    template = graphs[recipe.base if recipe.base >= 0 else 0]
    base = graphs[recipe.base] if recipe.base >= 0 else None
    own = [calibrate(g, src) if calibrate is not None and src else None
           for g, src in zip(graphs, recipe.model_calibration or [None] * len(graphs))]
    source = recipe.tokenizer_source
    if source not in (None, "base", "union"):
        source = recipe.inputs.index(source) if source in recipe.inputs else source.partition("+")[0]
    return merge(graphs, recipe.method, base, model_parameters=recipe.model_parameters, names=recipe.inputs,
                 dtype=recipe.dtype, out_dtype=recipe.out_dtype, seed=seed, slices=recipe.slices, tokenizer_source=source,
                 calibration=calibrate(template, None) if calibrate is not None else None,
                 model_calibration=own, **recipe.parameters)
