"""``TrainConfig``: the options of ``splice.train``, and the single source of ``splice train``'s flags.

Torch-free, so ``splice train --help`` stays fast. Each field's metadata holds its ``help``
text, its ``choices`` and, for integers, its ``min``; ``__post_init__`` checks those and the
CLI (``splice/cli/train.py``) generates one ``--flag`` per field from them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from splice.errors import ConfigError

LOSSES = ("causal_lm", "masked_lm", "embedding", "classification")
SCHEDULES = ("linear", "cosine", "constant")
TRAINABLE = ("adapters", "norms", "biases", "weights")


def _option(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    loss: str = _option("causal_lm", "the training objective, see docs/training.md", choices=LOSSES)
    trainable: str = _option("adapters", "what training updates, a comma list of " + ", ".join(TRAINABLE)
                             + " (norms,biases = PERP's recovery of a pruned model; pruned weights stay zero)")
    steps: int = _option(100, "optimizer steps", min=1)
    lr: float = _option(2e-4, "peak learning rate")
    batch_size: int = _option(4, "examples per micro-batch", min=1)
    grad_accum: int = _option(1, "micro-batches per step", min=1)
    seq_len: int = _option(256, "tokens per example", min=1)
    warmup: int = _option(0, "linear warm-up steps", min=0)
    schedule: str = _option("linear", "learning-rate decay after warm-up", choices=SCHEDULES)
    weight_decay: float = _option(0.0, "AdamW weight decay")
    max_grad_norm: float = _option(1.0, "gradient-norm clipping, 0 = off")
    eval_every: int = _option(0, "also evaluate every N steps, 0 = only before and after", min=0)
    checkpoint_every: int = _option(50, "steps between checkpoints", min=0)
    seed: int = _option(0, "random seed: batch order, dropout")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ConfigError(f"train: {f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
            if "min" in f.metadata and (not isinstance(value, int) or value < f.metadata["min"]):
                what = "a positive integer" if f.metadata["min"] == 1 else f"an integer >= {f.metadata['min']}"
                raise ConfigError(f"train: {f.name} must be {what}, got {value!r}")
        kinds = self.trainable_kinds()
        if not kinds or any(k not in TRAINABLE for k in kinds):
            raise ConfigError(f"train: trainable must be a comma list of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train: lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("train: weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0 = no clipping)")
        if self.warmup >= self.steps and self.schedule != "constant":
            raise ConfigError(f"train: warmup ({self.warmup}) must be smaller than steps ({self.steps})")

    def trainable_kinds(self) -> list[str]:
        return [k.strip() for k in self.trainable.split(",") if k.strip()]

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return step / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def run_fingerprint(self) -> dict:
        """The options a resumed run must share with the checkpoint's."""
        return {k: v for k, v in asdict(self).items() if k not in ("eval_every", "checkpoint_every")}
