"""Training a graph's trainable tensors (adapters, QAT parameters): ``splice.train``.

Hooks for methods that act during training live in ``splice.train.hooks``.
"""
from splice.train.hooks import TrainHook, register_train_hook

__all__ = ["TrainHook", "register_train_hook"]
