"""``splice export ART --hf DIR``: a transformers directory (config + safetensors) that
``from_pretrained`` loads, for a float graph captured from a transformers model — typically one
pruned structurally (fewer MLP channels, heads, KV groups or blocks) or merged.

The tensors keep their names (a captured graph's stored tensors are the model's state-dict keys);
blocks removed by depth pruning are renumbered. The config is the source model's with the integer
fields the new shapes need: each candidate change scales a field by a ratio one tensor's shape
changed by, and a change is kept when it lowers the number of state-dict shapes that disagree with
the graph's (the model is built on the meta device, no weights), until none disagree. Per-layer
widths that one config cannot express leave disagreements, and the export is refused naming the
first tensor. A config that derives ``head_dim`` from ``hidden_size / num_attention_heads`` gets it
written out, so removing heads does not widen the rest.
"""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import torch

from splice.errors import SpliceError
from splice.kernels.registry import record

_INDEXED = re.compile(r"^(.*\.)(\d+)(\..*)$")


def _source_config(graph):
    import transformers

    src = graph.source
    if src.get("kind") != "hf" or not src.get("path"):
        raise SpliceError(f"--hf: the artifact was not captured from a transformers model (source kind "
                          f"{src.get('kind', '?')!r}); only those have a config to write")
    kw = {"gguf_file": src["gguf_file"]} if src.get("gguf_file") else {}
    try:
        config = transformers.AutoConfig.from_pretrained(src["path"], local_files_only=True, **kw)
    except Exception as e:
        raise SpliceError(f"--hf: cannot read the source model's config at {src['path']}: "
                          f"{str(e).splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "head_dim", None) is None and getattr(config, "num_attention_heads", None):
        # attention classes read config.head_dim when set, else hidden_size / heads: written out, fewer
        # heads keep their width
        config.head_dim = config.hidden_size // config.num_attention_heads
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    auto = transformers.AutoModelForCausalLM if kw else transformers.AutoModel  # a GGUF config names no class
    return config, cls or auto._model_mapping[type(config)]


def float_tensors(graph) -> dict[str, torch.Tensor]:
    """The graph's stored tensors by name, blocks renumbered after depth pruning; refuses splice ops
    that store weights in their own format (quantized, adapters not folded)."""
    stored = sorted({str(n.target).replace(".default", "") for n in graph.gm.graph.nodes
                     if n.op == "call_function" and record(n.target) is not None})
    if stored:
        raise SpliceError(f"--hf writes float transformers weights; this graph uses {', '.join(stored)} "
                          "(store plain weights first: adapter.fold, delta.apply, merge.rmm_select:fold=true, "
                          "prune.bip_finish; or export before quantizing)")
    tensors = {k: v.detach() for k, v in graph.tensors().items()}
    renumber = {prefix: {old: new for new, old in enumerate(sorted(ix))}
                for prefix, ix in _indices_by_prefix(tensors).items()}
    out = {}
    for name, t in tensors.items():
        m = _INDEXED.match(name)
        out[f"{m.group(1)}{renumber[m.group(1)][int(m.group(2))]}{m.group(3)}" if m else name] = t
    return out


def with_ties(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` plus, for each parameter ``model`` ties under several names (embedding and LM
    head), every name of it when the graph stores it under one."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = dict(tensors)
    for group in names.values():
        have = [n for n in group if n in tensors]
        for n in group:
            if have and n not in out:
                out[n] = tensors[have[0]]
    return out


def _indices_by_prefix(names) -> dict[str, set[int]]:
    """The block indices of indexed names by their prefix (``model.layers.`` -> {0, 1, …})."""
    indices: dict[str, set[int]] = {}
    for name in names:
        if m := _INDEXED.match(name):
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
    return indices


def _stack_indices(names) -> list[int]:
    """The block indices of the longest stack of indexed names (``model.layers.{i}.…``)."""
    indices = _indices_by_prefix(names)
    return sorted(max(indices.values(), key=len)) if indices else []


def kept_blocks(graph) -> list[int]:
    """The original indices of the stack's blocks still in the graph (after depth pruning)."""
    return _stack_indices(graph.tensors())


def _disagreements(config, cls, tensors) -> list[str]:
    """State-dict entries of ``cls(config)`` whose shape is not the graph's, parameters it lacks
    (tied ones counted once; buffers the graph folded away are not required), and the graph's block
    tensors it has no place for."""
    try:
        with torch.device("meta"):
            model = cls._from_config(config)
    except Exception:  # a combination the model class rejects: fits nothing
        return list(tensors)
    params, state = dict(model.named_parameters()), model.state_dict()
    tensors = with_ties(model, tensors)
    return [k for k, v in state.items() if k in tensors and tuple(v.shape) != tuple(tensors[k].shape)] + \
           [k for k in params if k not in tensors] + \
           [k for k in tensors if k not in state and _INDEXED.match(k)]  # blocks the config lacks (a longer stack)


def _candidates(config, ratios: set[Fraction]):
    for field, value in config.to_diff_dict().items():
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            for r in ratios:
                new = value * r
                if new.denominator == 1 and 0 < new != value:
                    yield field, int(new)


def _changed(config, field: str, value: int, kept: list[int], blocks: int) -> dict:
    """``{field: value}`` plus every per-layer list of the config (``layer_types``) cut to the kept
    layers when ``field`` is the block count (``blocks`` before, ``len(kept)`` after; a list whose
    entries are all equal takes any length: a restacked, longer model)."""
    old = getattr(config, field)
    out = {field: value}
    if old == blocks and value == len(kept):
        for name, lst in config.__dict__.items():
            if isinstance(lst, list) and len(lst) == old:
                if all(x == lst[0] for x in lst):
                    out[name] = [lst[0]] * value
                elif max(kept) < old:
                    out[name] = [lst[i] for i in kept]
                else:
                    raise SpliceError(f"--hf: the config's per-layer '{name}' differs by layer and the graph's "
                                      f"{value} blocks were restacked; which entry each takes is unknown")
    return out


def fit_config(config, cls, tensors: dict[str, torch.Tensor], accept, kept: list[int]) -> object:
    """``config`` with the integer fields the graph's tensor shapes need (see the module doc): changes
    that lower the disagreements are tried fewest-left first, depth first, and a config that fits
    every shape must also be ``accept``ed — compute what the graph computes — since shapes alone can
    split heads × head_dim two ways."""
    import copy

    with torch.device("meta"):
        reference = cls._from_config(config).state_dict()
    ratios = {Fraction(b, a) for k, v in reference.items() if k in tensors
              for a, b in zip(v.shape, tensors[k].shape) if a != b and a}
    blocks = len(_stack_indices(reference))
    if blocks and kept:
        ratios.add(Fraction(len(kept), blocks))
    worst: list[str] = []

    def search(cfg, left: list[str], depth: int):
        if not left:
            return cfg if accept(cfg) else None
        trials = []
        for field, value in _candidates(cfg, ratios):
            trial = copy.deepcopy(cfg)
            trial.__dict__.update(_changed(cfg, field, value, kept, blocks))  # together: configs validate on setattr
            trials.append((_disagreements(trial, cls, tensors), trial))
        better = sorted((t for t in trials if len(t[0]) < len(left)), key=lambda t: len(t[0]))
        if not better or depth > 8:
            worst[:] = worst or left
            return None
        for trial_left, trial in better:  # fewest disagreements first
            if (found := search(trial, trial_left, depth + 1)) is not None:
                return found
        return None

    found = search(copy.deepcopy(config), _disagreements(config, cls, tensors), 0)
    if found is None and worst:
        name = worst[0]
        raise SpliceError(f"--hf: no {type(config).__name__} gives '{name}' the shape "
                          f"{tuple(tensors[name].shape) if name in tensors else 'the graph has'}: per-layer widths "
                          "differ, which one transformers config cannot express")
    if found is None:
        raise SpliceError(f"--hf: no {type(config).__name__} with the graph's shapes computes what the graph computes")
    return found


def _model(config, cls, tensors):
    model = cls._from_config(config, torch_dtype=torch.float32)
    tensors = with_ties(model, tensors)
    model.load_state_dict({k: tensors[k] for k in model.state_dict() if k in tensors}, strict=False)
    return model.eval()


def _refuse_shared_blocks(graph) -> None:
    """A tensor read by ops of two blocks (``recurse.slice``, block sharing) has no place in a
    transformers model, which stores every layer's weights: refused, naming it."""
    from splice.ir.segments import block_of
    from splice.ir.weights import shared_tensors

    for target, readers in shared_tensors(graph).items():
        blocks = sorted({b for b in (block_of(n) for n in readers) if _INDEXED.match(b + ".")})
        if len(blocks) > 1:
            raise SpliceError(f"--hf: '{target}' is shared by blocks {blocks[0]} and {blocks[1]} (a recursive or "
                              "weight-shared model); transformers stores each layer's own weights: export to ONNX "
                              "or keep the artifact")


def export_hf(graph, path: Path) -> None:
    """Write the transformers directory ``path`` (the caller stages it: ``splice export`` writes
    into a temporary directory moved into place when done)."""
    _refuse_shared_blocks(graph)
    config, cls = _source_config(graph)
    tensors = float_tensors(graph)

    def same_outputs(cfg) -> bool:
        return _max_diff(graph, _model(cfg, cls, tensors), [graph.example_inputs]) <= 1e-4

    config = fit_config(config, cls, tensors, same_outputs, kept_blocks(graph))
    config.use_cache = True
    _model(config, cls, tensors).save_pretrained(path, safe_serialization=True)


def _max_diff(graph, model, inputs_list: Sequence) -> float:
    worst = 0.0
    with torch.no_grad():
        for inputs in inputs_list:
            ours = next(iter(graph.run(*inputs).values()))
            kw = dict(zip(graph.input_names, inputs))
            theirs = model(**kw, use_cache=False) if "input_ids" in kw else model(**kw)
            theirs = theirs[0] if isinstance(theirs, tuple) else next(iter(theirs.values()))
            worst = max(worst, float((ours - theirs).abs().max()))
    return worst


def check_hf(graph, path: Path, inputs_list: Sequence, verbose: bool = False) -> float:
    """Max |transformers (``from_pretrained(path)``) − graph| over the first output on each inputs."""
    _, cls = _source_config(graph)
    model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa")
    return _max_diff(graph, model.eval(), inputs_list)
