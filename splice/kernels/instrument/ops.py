"""``splice::observe``: the identity op calibration hangs on a tensor (``instrument.observe`` inserts
it, a pass removes it before export, so it has no backend translation)."""
from __future__ import annotations

import torch

from splice.kernels._sample import Sampler
from splice.kernels.instrument.store import record
from splice.kernels.registry import register_op


@torch.library.custom_op("splice::observe", mutates_args=())
def observe(x: torch.Tensor, key: str) -> torch.Tensor:
    """Identity that feeds ``x`` to the active calibration store (``instrument/store.py``).
    Inserted by ``instrument.observe``; removed before export."""
    record(key, x)
    return x.clone()


@observe.register_fake
def _(x, key):
    return torch.empty_like(x)


observe.register_autograd(lambda ctx, grad: (grad, None))
register_op(observe, family="instrument", sample_inputs=lambda: (Sampler()(2, 3, 8), "layer.0"))
