"""Training hooks: how methods that act *during* training plug into a training loop, through the IR.

The protocol lives below both the passes that define hooks and the loop that calls them
(``splice.train``), so neither imports the other: a pass registers here, the loop asks here
what the graph it trains needs. A method that needs more than "minimise the loss over the
trainable tensors" registers a hook factory once, at import time::

    class TrainHook:                      # base class, no-op methods
        def regularizer(self, step, total) -> torch.Tensor | None   # added to the loss
        def after_backward(self, step, total) -> None               # grads are populated
        def after_step(self, step, total) -> None                   # after optimizer.step()

    register_train_hook(factory)   # factory(graph) -> TrainHook | None, called when training starts

When training starts, every registered factory is called with the graph being trained (the copy
whose trainable tensors the optimizer updates; read and replace them through ``graph.tensor`` /
the adapter sites). A factory returns ``None`` when the graph has nothing for it (e.g. no AdaLoRA
adapter), otherwise a ``TrainHook`` that lives for that run. ``step`` counts optimizer steps from
0 to ``total - 1``; with gradient accumulation ``regularizer`` is called once per micro-batch
(its value is divided by the accumulation count like the loss), the other two once per step.

Adapter dropout is not a hook: a pass marks a node's input for dropout with ``set_input_dropout``
(kept in ``node.meta``, so it survives copy and save/load) and the loop applies ``aten.dropout``
there on its training copy only (``input_dropouts`` lists them).

Uses: AdaLoRA's rank budget (``after_backward`` accumulates sensitivity from the grads,
``after_step`` masks singular values on the budget schedule, ``regularizer`` adds the
orthogonality penalty); SORSA's orthonormal regularizer (``regularizer``); QAT's oscillation
dampening / freezing of oscillating weights (``regularizer`` and ``after_step``).
Hooks must not replace a trainable tensor object (the optimizer holds it); update it in place
under ``torch.no_grad()``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from splice.ir.graph import Graph


class TrainHook:
    """Base class: every method is a no-op; override the ones a method needs."""

    def regularizer(self, step: int, total: int) -> torch.Tensor | None:
        """A scalar added to the loss of this step (``None``: nothing)."""
        return None

    def after_backward(self, step: int, total: int) -> None:
        """Called after the step's backward passes, before clipping and the optimizer: grads are populated."""

    def after_step(self, step: int, total: int) -> None:
        """Called after ``optimizer.step()`` (and the scheduler step)."""


HookFactory = Callable[[Graph], "TrainHook | None"]
_FACTORIES: list[HookFactory] = []


def register_train_hook(factory: HookFactory) -> HookFactory:
    """Register ``factory(graph) -> TrainHook | None``; usable as a decorator. Registering the same
    factory twice is a no-op."""
    if factory not in _FACTORIES:
        _FACTORIES.append(factory)
    return factory


def make_hooks(graph: Graph) -> list[TrainHook]:
    """The hooks of every registered factory that has something to do on ``graph``."""
    return [h for h in (f(graph) for f in _FACTORIES) if h is not None]


DROPOUT_KEY = "splice_input_dropout"


def set_input_dropout(node: fx.Node, p: float) -> None:
    """Mark ``node``'s first input for dropout with probability ``p`` while training (0: none).
    Stored in ``meta["custom"]`` (replaced, never mutated: copies share meta dicts)."""
    custom = {k: v for k, v in node.meta.get("custom", {}).items() if k != DROPOUT_KEY}
    node.meta["custom"] = {**custom, DROPOUT_KEY: str(float(p))} if p > 0 else custom


def input_dropouts(graph: Graph) -> list[tuple[fx.Node, float]]:
    """(node, p) for every node whose first input drops out during training."""
    return [(n, float(n.meta["custom"][DROPOUT_KEY])) for n in graph.gm.graph.nodes
            if DROPOUT_KEY in n.meta.get("custom", {})]
