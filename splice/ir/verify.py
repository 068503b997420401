"""Invariants every Graph satisfies between passes.

* the fx graph is well formed (``lint``) and its inputs are ``input_names``;
* every ``get_attr`` reaches a stored tensor, and float tensors are finite;
* shapes propagate: the graph runs under fake tensors on its example inputs (this checks
  every custom op's argument shapes through its fake implementation) and produces one
  output per ``output_names`` entry with the shapes and dtypes it had before the pass.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from splice.errors import VerifyError
from splice.ir.graph import Graph


def output_signature(graph: Graph) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the outputs on the example inputs (under fake tensors)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) for t in graph.example_inputs]
    outs = FakeTensorProp(graph.gm, mode).propagate_dont_convert_inputs(*fake_inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return [(tuple(o.shape), o.dtype) for o in outs]


def verify(graph: Graph, expected: list[tuple[tuple[int, ...], torch.dtype]] | None = None) -> None:
    """Raise VerifyError naming the first broken invariant."""
    try:
        graph.gm.graph.lint()
    except Exception as e:
        raise VerifyError(f"malformed graph: {e}") from e
    names = [n.name for n in graph.gm.graph.nodes if n.op == "placeholder"]
    if names != graph.input_names:
        raise VerifyError(f"graph inputs {names} differ from input_names {graph.input_names}")
    for target, t in _stored(graph):
        if t is None:
            raise VerifyError(f"get_attr '{target}' does not reach a stored tensor")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise VerifyError(f"tensor '{target}' has NaN or Inf values")
    try:
        sig = output_signature(graph)
    except Exception as e:
        raise VerifyError(f"shape propagation failed: {str(e).splitlines()[0]}") from e
    if len(sig) != len(graph.output_names):
        raise VerifyError(f"graph has {len(sig)} outputs but output_names lists {len(graph.output_names)}")
    if expected is not None and sig != expected:
        raise VerifyError(f"outputs changed shape/dtype: {expected} -> {sig}")


def _stored(graph: Graph):
    for node in graph.gm.graph.nodes:
        if node.op == "get_attr":
            try:
                t = graph.tensor(node.target)
            except AttributeError:
                t = None
            yield node.target, t if isinstance(t, torch.Tensor) or t is None else None
