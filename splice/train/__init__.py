"""Training a graph's trainable tensors (adapters, QAT parameters): ``splice.train``.

Modules: ``loop`` (the loop), ``config`` (``TrainConfig``, torch-free), ``losses``, ``data``
(formats, batching), ``checkpoint`` (save/resume), ``select`` (PASER: recovery data for a pruned model). How AdaLoRA, SORSA and QAT plug in is the
IR's training-hook protocol (``splice.ir.train_hooks``), below both the passes and this loop.
Names load on first use (PEP 562), so ``splice.train.config`` imports without torch.
"""
import importlib

_HOME = {"TrainConfig": "splice.train.config", "register_trainable_role": "splice.train.loop",
         "train": "splice.train.loop", "trainable_targets": "splice.train.loop", "Paser": "splice.train.select"}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'splice.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
