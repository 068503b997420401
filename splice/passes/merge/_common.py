"""What every merge method shares: its declaration (parameters, base policy, input counts), how a
parameter's value is resolved for one tensor (mergekit's semantics), and the pass that pairs the
inputs' tensors by graph structure and merges them one tensor at a time.

A merge method is a function of one tensor group — the base's tensor (if the method uses a base),
the other inputs' tensors, each input's resolved parameters — registered with ``register_merge`` as
the pass ``merge.<name>``. The pass runs on the *template* graph (the base, else the first input),
reads every input from ``ctx.graphs["inputs"]`` (a list; ``base`` is its index, or -1), pairs each
input's stored tensors with the template's (``ir/match.py``: isomorphism of the parameter-use
graphs, so module names may differ; another architecture is refused naming the first mismatch) and
replaces every float tensor that differs between the inputs by the method's result. Tensors equal in
every input (buffers such as RoPE frequencies) stay as they are.

Parameter values follow mergekit (``config.py``'s ``evaluate_setting``): a scalar; a list of numbers,
a gradient interpolated over the layers (``t`` = layer index / (layers − 1); tensors outside the
layer stack: ``t = 0``); a ``{filter, value}`` conditional or a list of them, the first whose filter
is a substring of the tensor's name winning (no filter or ``*``: always). A per-model parameter is
looked up in the model's own parameters, then the top-level ones. A data-aware method reads each
input's own calibration set (``ctx.datasets[model_dataset(i)]``) where one is given, else the shared one.

With ``slices`` (mergekit's other form, ``_slices.py``) the output's layer stack is assembled slice
by slice and each output layer merges the layers its slice's sources name; ``models`` is the one
slice of every model's whole stack. Either way the pass merges a list of ``Unit``s: an output tensor,
the inputs' tensors it is made of, and where its parameter values come from.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph, attr_users, set_attr
from splice.ir.match import match_parameters
from splice.ir.select import module_path, op_kind
from splice.ir.sparsity import weight_layers
from splice.ir.weights import shared_tensors, stored_weight, weight_args
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass
from splice.passes.merge._slices import slice_units
from splice.passes.merge._units import MergeInputs, Unit, check_inputs

REQUIRED = object()
BASE_POLICIES = ("required", "optional", "ignored")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method. ``per_model``: a value per merged input (mergekit's input
    scope; for a method with a base, the inputs besides it: the non-base scope)."""

    name: str
    kind: type
    default: Any = REQUIRED
    per_model: bool = False
    check: Callable[[Any], bool] | None = None
    valid: str = ""  # what ``check`` accepts, for the error message
    help: str = ""


def in_unit_open_closed(x) -> bool:
    return 0 < x <= 1


def in_unit_closed(x) -> bool:
    return 0 <= x <= 1


@dataclass
class Group:
    """One tensor of every input: ``base`` (None when the method has none) and the other inputs'
    ``tensors`` (all inputs for a method without a base), in the recipe's order, in the compute dtype;
    ``params``: shared values, and per-model ones as lists aligned with ``tensors``."""

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    params: dict[str, Any]
    generator: torch.Generator
    who: str  # the pass, for errors
    stats: list[torch.Tensor | None] = field(default_factory=list)  # data-aware methods: per tensor, per input
    kind: str | None = None  # the op kind of the tensor's first reader (linear, embedding, conv; None: other)

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.who}: {message} (tensor '{self.name}')")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    reference: str
    fn: Callable[[Group], torch.Tensor]
    params: tuple[Param, ...] = ()
    base: str = "ignored"
    min_models: int = 1  # inputs besides the base
    max_models: int | None = None
    summary: str = ""
    # data-aware methods: (input graph, calibration, pass name) -> {that graph's tensor target: statistic}
    statistic: Callable[[Graph, list, str], dict[str, torch.Tensor]] | None = None
    applies: Applies | None = None  # the models it applies to (default: any)
    # whether a merge's config needs calibration data (default: whether the method has a statistic)
    needs_data: Callable[["MergeConfig"], bool] | None = None
    # methods whose result is not one tensor: (graph, template target, fn's result) -> rewrites the graph
    install: Callable[[Graph, str, Any], None] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


METHODS: dict[str, MergeMethod] = {}


@dataclass(frozen=True, kw_only=True)
class MergeConfig(PassConfig):
    """A merge of the graphs in ``ctx.graphs['inputs']`` (``splice.merge`` / ``splice merge`` fill these)."""

    base: int = field(default=-1, metadata={"help": "index of the base model among the inputs (-1: none)"})
    parameters: str = field(default="{}", metadata={"help": "top-level parameters, JSON (mergekit's semantics)"})
    model_parameters: str = field(default="[]", metadata={"help": "each input's parameters, a JSON list"})
    names: str = field(default="[]", metadata={"help": "each input's name (path) for reports and errors, JSON list"})
    slices: str = field(default="[]", metadata={
        "help": "output layer slices instead of whole models, JSON [{sources: [{input, layer_range, parameters}], "
                "base, parameters}]"})
    dtype: str = field(default="", metadata={"help": "compute dtype (float32, bfloat16, float16, float64; empty: the inputs')"})
    out_dtype: str = field(default="", metadata={"help": "the merged weights are rounded to this dtype (empty: dtype)"})

    def __post_init__(self):
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value and value not in DTYPES:
                raise ValueError(f"{key} must be one of {', '.join(DTYPES)}, got {value!r}")
        for key, kind in (("parameters", dict), ("model_parameters", list), ("names", list), ("slices", list)):
            try:
                ok = isinstance(json.loads(getattr(self, key)), kind)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise ValueError(f"{key} must be a JSON {kind.__name__}")


def register_merge(method: MergeMethod, run: Callable | None = None) -> MergeMethod:
    """Register ``method`` and its pass ``merge.<name>`` (``run(graph, cfg, ctx)``: a pass of its
    own instead of the tensor-by-tensor ``merge_graphs``)."""
    METHODS[method.name] = method

    def tensorwise(graph: Graph, cfg: MergeConfig, ctx: PassContext) -> PassResult:
        return merge_graphs(graph, cfg, ctx, method)

    run = run or tensorwise
    run.__doc__ = method.summary
    config = type(f"{method.name}_config", (MergeConfig,), {"__doc__": method.summary})  # the summary `splice passes` shows
    register_pass(f"merge.{method.name}", config, reference=method.reference, graphs=("inputs",),
                  needs_calibration=method.needs_data or method.statistic is not None, applies=method.applies,
                  report_fields={"tensors_merged": "tensors merged", "tensors_kept": "buffers equal in every input"})(run)
    return method


def model_dataset(index: int) -> str:
    """The name of input ``index``'s own calibration set in ``ctx.datasets`` (else it reads the shared one)."""
    return f"merge_input_{index}"


def unset_for_some_model(cfg: MergeConfig, key: str) -> bool:
    """Whether some merged (non-base) input of ``cfg`` has no (or a zero) scalar ``key`` of its
    own or at the top level (a method's ``needs_data``: the value would come from calibration)."""
    top, models = json.loads(cfg.parameters), json.loads(cfg.model_parameters)
    merged = [m for i, m in enumerate(models) if i != cfg.base] or [{}]
    return any(not m.get(key, top.get(key)) for m in merged)


def get_method(name: str, where: str = "merge") -> MergeMethod:
    if name not in METHODS:
        hint = difflib.get_close_matches(name, list(METHODS), n=1)
        more = f"; did you mean '{hint[0]}'?" if hint else f" (one of {', '.join(sorted(METHODS))})"
        raise ConfigError(f"{where}: unknown merge method '{name}'{more}")
    return METHODS[name]


# ------------------------------------------------------------------ parameter values


def _coerce(method: MergeMethod, p: Param, value: Any, where: str) -> Any:
    if p.kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            value = float(value)
        except ValueError:
            pass
    if p.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, p.kind) or (p.kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"merge.{method.name}: {p.name} must be a {p.kind.__name__}, got {value!r}{where}")
    if p.check is not None and not p.check(value):
        raise ConfigError(f"merge.{method.name}: {p.name} must be in {p.valid}, got {value}{where}")
    return value


def evaluate_setting(setting: Any, tensor: str, t: float) -> Any:
    """A setting's value for ``tensor`` at layer position ``t`` (module docstring); None: no match."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in tensor:
            return evaluate_setting(cond.get("value"), tensor, t)
    return None


def check_setting_names(method: MergeMethod, settings: dict, where: str) -> None:
    """Every key of ``settings`` is a parameter of ``method`` (a did-you-mean otherwise)."""
    for key in settings:
        if method.param(key) is None:
            hint = difflib.get_close_matches(key, [p.name for p in method.params], n=1)
            more = f"; did you mean '{hint[0]}'?" if hint else (
                f" (it has {', '.join(p.name for p in method.params)})" if method.params else " (it takes none)")
            raise ConfigError(f"{where}: merge method '{method.name}' has no parameter '{key}'{more}")


def resolve(method: MergeMethod, shared: list[dict], own: dict[int, list[dict]], names: list[str],
            non_base: list[int], tensor: str, t: float) -> dict[str, Any]:
    """Every parameter's value for ``tensor``: shared ones from ``shared`` (settings, first wins) as
    scalars, per-model ones from each input's ``own`` settings as lists over ``non_base`` (the
    inputs the method merges besides the base, by index)."""
    out = {}
    for p in method.params:
        if not p.per_model:
            out[p.name] = setting_value(method, p, shared, tensor, t, "")
            continue
        out[p.name] = [setting_value(method, p, own[i], tensor, t, f" (input '{names[i]}')") for i in non_base]
    return out


def setting_value(method: MergeMethod, p: Param, sources: list[dict], tensor: str, t: float,
                  where: str = "") -> Any:
    """``p``'s value for ``tensor`` from the first of ``sources`` that sets it, checked; else its default."""
    for settings in sources:
        if p.name in settings:
            value = evaluate_setting(settings[p.name], tensor, t)
            if value is not None:
                return _coerce(method, p, value, f"{where} for '{tensor}'")
    if p.default is REQUIRED:
        raise ConfigError(f"merge.{method.name}: parameter '{p.name}' is required{where}")
    return p.default


# ------------------------------------------------------------------ the pass


def recipe_names(graph: Graph, targets: Sequence[str]) -> dict[str, str]:
    """The name a recipe's filters see for each tensor: its own, or for a tied weight the parameter
    name at its first reader (``model.embed_tokens.weight``, not ``lm_head.weight``: the name the
    checkpoint stores it under, which mergekit reads)."""
    tied = shared_tensors(graph)
    out = {}
    for t in targets:
        first = tied[t][0] if t in tied else None
        path = module_path(first) if first is not None else ""
        out[t] = f"{path}.{t.rsplit('.', 1)[-1]}" if path else t
    return out


def layer_positions(targets: Sequence[str]) -> dict[str, float]:
    """mergekit's ``t`` of each tensor: its layer index / (layers − 1), 0 outside the layer stack."""
    index = {t: int(m.group(1)) for t in targets if (m := _LAYER.search(t))}
    layers = max(index.values(), default=0) + 1
    return {t: (index[t] / (layers - 1) if layers > 1 else 1.0) if t in index else 0.0 for t in targets}


def check_float(graph: Graph, name: str, who: str) -> None:
    """Merging reads float weights: a layer stored in a splice format (quantized, an adapter, a
    packed sparse weight) is refused, naming its op."""
    for node in graph.gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", "aten") == "splice" and \
                (weight_args(node) is not None or any(getattr(a, "op", None) == "get_attr" for a in node.args)):
            raise ConfigError(f"{who}: input '{name}' holds {node.target.name().replace('::', '.')} at "
                              f"'{module_path(node) or node.name}'; merge float models (fold adapters first, "
                              "quantize after merging)")


def read_inputs(graph: Graph, cfg: MergeConfig, ctx: PassContext, method: MergeMethod) -> MergeInputs:
    """The inputs of ``ctx.graphs['inputs']`` with their names and parameters, every setting name
    checked, every input a float model paired with the template by structure."""
    who = f"merge.{method.name}"
    inputs: list[Graph] = list(ctx.graphs["inputs"])
    names = json.loads(cfg.names) or [f"input {i}" for i in range(len(inputs))]
    per_model = json.loads(cfg.model_parameters) or [{} for _ in inputs]
    top = json.loads(cfg.parameters)
    if len(per_model) != len(inputs) or len(names) != len(inputs):
        raise ConfigError(f"{who}: {len(inputs)} inputs but {len(per_model)} parameter sets / {len(names)} names")
    check_setting_names(method, top, who)
    for settings, name in zip(per_model, names):
        check_setting_names(method, settings, f"{who} (input '{name}')")
    for g, n in zip(inputs, names):
        check_float(g, n, who)
    template = names[cfg.base if cfg.base >= 0 else 0]
    pairs = [match_parameters(graph, g, (template, n), who) for g, n in zip(inputs, names)]
    return MergeInputs(inputs, names, per_model, top, [{a: b for b, a in p.items()} for p in pairs])


def model_units(graph: Graph, cfg: MergeConfig, method: MergeMethod, inputs: MergeInputs) -> list[Unit]:
    """``models``: every float tensor of the template merged from the same tensor of every input."""
    merged = check_inputs(method, len(inputs.graphs), cfg.base)
    base = cfg.base if method.base != "ignored" else -1
    floats = [t for t, v in graph.tensors().items() if v.is_floating_point()]
    positions = layer_positions(floats)
    own = {i: [m, inputs.top] for i, m in enumerate(inputs.per_model)}
    return [Unit(t, {i: src[t] for i, src in enumerate(inputs.sources)}, merged, base, [inputs.top], own, positions[t])
            for t in floats]


def merge_graphs(graph: Graph, cfg: MergeConfig, ctx: PassContext, method: MergeMethod) -> PassResult:
    inputs = read_inputs(graph, cfg, ctx, method)
    report: dict[str, Any] = {"method": method.name, "inputs": inputs.digests(),
                              "base": inputs.names[cfg.base] if cfg.base >= 0 else None}
    if json.loads(cfg.slices):
        units, layout = slice_units(graph, cfg, method, inputs)
        report.update(layout)
    else:
        units = model_units(graph, cfg, method, inputs)
    dtype = DTYPES.get(cfg.dtype)
    out_dtype = DTYPES.get(cfg.out_dtype) or dtype
    stats = [method.statistic(g, ctx.datasets.get(model_dataset(i)) or ctx.calibration or [], f"merge.{method.name}")
             if method.statistic else {} for i, g in enumerate(inputs.graphs)]
    recipe_name = recipe_names(graph, [u.target for u in units])
    readers, roles = attr_users(graph.gm), graph.param_roles()
    merged = kept = 0
    for u in units:
        ids = ([u.base] if u.base >= 0 else []) + u.merged
        values = {i: inputs.graphs[i].tensor(u.source[i]).detach() for i in ids}
        first = values[ids[0]]
        if roles[u.target] == "buffer" and all(torch.equal(first, v) for v in values.values()):
            kept += 1  # a buffer the same in every input (RoPE frequencies): not a weight to merge
            continue
        work = {i: v.to(dtype or v.dtype) for i, v in values.items()}
        params = resolve(method, u.shared, u.own, inputs.names, u.merged, recipe_name[u.target], u.t)
        group = Group(u.target, work[u.base] if u.base >= 0 else None, [work[i] for i in u.merged], params,
                      torch.Generator().manual_seed(ctx.seed + _stable(u.target)), f"merge.{method.name}",
                      [stats[i].get(u.source[i]) for i in u.merged], _reader_kind(readers.get(u.target, [])))
        result = method.fn(group)
        if method.install is not None:
            method.install(graph, u.target, result)
        else:
            set_attr(graph.gm, u.target, result.to(out_dtype or first.dtype).to(graph.tensor(u.target).dtype))
        merged += 1
    if method.install is not None:
        graph.finalize()
    keep_pruned(graph)
    report.update(tensors_merged=merged, tensors_kept=kept)
    return PassResult(graph, True, report)


def _reader_kind(readers: list) -> str | None:
    """The op kind a tensor is read as: ``embedding`` for a tied table (also read by the LM head), else its first reader's."""
    kinds = [op_kind(r) for r in readers]
    return "embedding" if "embedding" in kinds else next(iter(kinds), None)


def keep_pruned(graph: Graph) -> None:
    """The template's pruning masks hold in the merge: its pruned weights stay exactly zero (in place)."""
    layers = weight_layers(graph)
    for key, keep in graph.masks.items():
        node = layers.get(key)
        if node is not None and node.target.namespace == "aten":
            target = stored_weight(node).target
            set_attr(graph.gm, target, graph.tensor(target).detach() * keep.to(graph.tensor(target).dtype))


def _stable(name: str) -> int:
    """A seed offset from a tensor's name, the same in every process (``hash`` is salted)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
