"""``share.tie``: stored tensors equal within ``tol`` (same shape and dtype, max |a − b| ≤ tol ·
max |a|) become one tensor that every reader reads — stored once in the artifact and in ONNX. With
``tol=0`` (the default) only bit-identical tensors tie and outputs are unchanged; above it the
first tensor of each group (graph order) stands for the rest. Targets limit which tensors are
considered (``targets=linear`` etc., as quantizers select layers; default every float weight, bias
and norm gain — never adapter tensors, scales or quantized data).
Reference: weight tying, https://arxiv.org/abs/1608.05859 (tying as a post-hoc compression).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.ir.graph import Graph
from splice.ir.select import select_nodes, validate_targets
from splice.ir.weights import stored_weight
from splice.passes.base import Applies, PassConfig, PassContext, PassResult, register_pass

WHO = "share.tie"
TIED_ROLES = ("weight", "bias", "norm")  # model weights; not adapters, scales or quantized data


@dataclass(frozen=True, kw_only=True)
class TieConfig(PassConfig):
    """Tie stored tensors equal within a tolerance into one."""

    tol: float = field(default=0.0, metadata={"help": "max |a - b| / max |a| for two tensors to tie (0: identical)"})
    targets: str = field(default="", metadata={"help": "only these layers' weights (linear, conv, embedding, globs; "
                                                        "empty: every float tensor)"})

    def __post_init__(self):
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.targets:
            validate_targets(self.targets)


def _candidates(graph: Graph, cfg: TieConfig) -> list[str]:
    if cfg.targets:
        nodes = select_nodes(graph.gm, cfg.targets, ("linear", "conv", "embedding"), WHO)
        return list(dict.fromkeys(stored_weight(n).target for n in nodes))
    roles = graph.param_roles()
    return [t for t, v in graph.tensors().items() if v.is_floating_point() and roles[t] in TIED_ROLES]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    if tol == 0:
        return torch.equal(a, b)
    return float((a - b).abs().max()) <= tol * float(a.abs().max())


def ties(graph: Graph, cfg: TieConfig) -> dict[str, str]:
    """Each tensor to tie -> the earlier tensor it ties to."""
    tensors = graph.tensors()
    keep: list[str] = []
    into: dict[str, str] = {}
    for name in _candidates(graph, cfg):
        value = tensors[name].detach()
        match = next((k for k in keep if tensors[k].shape == value.shape and tensors[k].dtype == value.dtype
                      and _close(tensors[k].detach(), value, cfg.tol)), None)
        if match is None:
            keep.append(name)
        else:
            into[name] = match
    return into


def _has_equal_weights(graph: Graph) -> bool:
    return bool(ties(graph, TieConfig()))


@register_pass(WHO, TieConfig, reference="https://arxiv.org/abs/1608.05859",
               applies=Applies("two or more equal weights", check=_has_equal_weights),
               report_fields={"tied": "tensors tied to another", "bytes_saved": "stored bytes saved"})
def tie(graph: Graph, cfg: TieConfig, ctx: PassContext) -> PassResult:
    tensors, into = graph.tensors(), ties(graph, cfg)
    for node in graph.gm.graph.nodes:
        if node.op == "get_attr" and node.target in into:
            node.target = into[node.target]
    saved = sum(tensors[t].numel() * tensors[t].element_size() for t in into)
    graph.finalize()
    return PassResult(graph, True, {"tied": len(into), "bytes_saved": saved,
                                    "groups": {k: sorted(t for t, v in into.items() if v == k) for k in set(into.values())}})
