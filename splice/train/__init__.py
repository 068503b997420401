"""Training a graph's trainable tensors (adapters, QAT parameters): ``splice.train``.

Modules: ``loop`` (the loop, ``TrainConfig``), ``losses``, ``data`` (formats, batching),
``checkpoint`` (save/resume), ``hooks`` (how AdaLoRA, SORSA, QAT plug in).
"""
from splice.train.hooks import TrainHook, register_train_hook
from splice.train.loop import TrainConfig, register_trainable_role, train, trainable_targets

__all__ = ["TrainConfig", "TrainHook", "register_train_hook", "register_trainable_role", "train", "trainable_targets"]
