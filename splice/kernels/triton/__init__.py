"""Triton implementations of splice ops, registered as their CUDA kernels.

``splice::qlinear`` on CUDA tensors runs ``triton/qlinear.py``'s fused dequantize + matmul when
Triton is installed (``pip install splice[triton]``) and the format is one it covers (int4/int8,
groups of a multiple of 16); otherwise the reference implementation. Triton is imported on the
first CUDA call only, so importing splice stays cheap and CPU-only installs never load it.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from splice.kernels.quant import dequantize_packed


@torch.library.register_kernel("splice::qlinear", "cuda")
def _qlinear_cuda(x, qweight, scales, zeros, bias, bits, group_size):
    if importlib.util.find_spec("triton") is not None:
        from splice.kernels.triton import qlinear as kernel

        if kernel.supports(bits, group_size):
            return kernel.qlinear(x, qweight, scales, zeros, bias, bits, group_size)
    return F.linear(x, dequantize_packed(qweight, scales, zeros, bits, group_size).to(x.dtype), bias)
