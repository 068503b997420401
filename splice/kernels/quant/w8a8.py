"""W8A8 arithmetic (``splice::w8a8_linear``): int8 weights, one symmetric int8 scale per output
channel; activations quantized at run time to int8, one symmetric scale per token.

This is SmoothQuant's "per-token dynamic" W8A8 (https://arxiv.org/abs/2211.10438, O3 setting;
llm-compressor's W8A8 int8 scheme, torchao's ``int8_dynamic_activation_int8_weight``).

* weights ``W [N, K]``: ``s_n = max_k |W_nk| / 127`` (1 for an all-zero row),
  codes ``round(W / s_n)`` in ``-127..127``, stored int8 ``[N, K]``;
* activations ``x [..., K]``, per token (row of ``x`` flattened to ``[T, K]``):
  ``s_t = max(max_k |x_tk| / 127, 1e-12)``, ``q = round(x / s_t)`` (half to even; ``|x / s_t| <= 127``
  by construction, so no clamp);
* ``y = (float32(Σ_k q_tk · codes_nk) · s_n) · s_t + bias`` with the integer sum exact.

The products and their order are the ones the ONNX form computes (``kernels/quant/onnx.py``:
``MatMulIntegerToFloat`` gives ``acc · (1 · s_n)``, then ``Mul`` by ``s_t``), so ONNX Runtime
reproduces the reference bit for bit. Computed in float32 (the input is cast, the output cast back).
"""
from __future__ import annotations

import torch

QMAX = 127
ACT_EPS = 1e-12  # smallest activation scale: an all-zero token quantizes to zeros


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-token scales ``[..., 1]`` of float32 ``x [..., K]``."""
    return (x.abs().amax(-1, keepdim=True) / QMAX).clamp(min=ACT_EPS)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[N, K]`` and float32 scales ``[N]`` of ``w [N, K]``."""
    w = w.detach().float()
    scale = w.abs().amax(1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The reference ``y = x Wᵀ + bias`` of the module docstring."""
    xf = x.float()
    s = token_scales(xf)
    q = torch.round(xf / s).to(torch.int8).reshape(-1, x.shape[-1])
    acc = torch._int_mm(q, qweight.T)  # int32, exact
    y = (acc.float() * w_scale.float()).reshape(*x.shape[:-1], qweight.shape[0]) * s
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
