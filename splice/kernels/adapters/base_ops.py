"""Adapter ops that read the base layer: DoRA and SSF beside it, IA3 and Bat recomputing it
(``splice::dora_delta``, ``ia3_scale``, ``ia3_ff_linear``, ``bat_linear``, ``ssf_delta``). The base's
operands come first (x; y, the base output; W, b), then the adapter's tensors; the math is in
``adapters/base_deltas.py``; gradients by recomputation (DoRA's norm is detached there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.kernels._sample import Sampler
from splice.kernels.adapters import base_deltas
from splice.kernels.adapters.delta_ops import ONNX
from splice.kernels.adapters.factored import autograd_by_recompute
from splice.kernels.registry import register_op


@torch.library.custom_op("splice::dora_delta", mutates_args=())
def dora_delta(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
               B: torch.Tensor, magnitude: torch.Tensor, lora_scale: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DoRA (https://arxiv.org/abs/2402.09353): ``y + delta = m/‖W+sBA‖·(W+sBA) x + b``. A ``[r, in]``,
    B ``[out, r]`` (PEFT's lora_A/lora_B), magnitude ``[out]`` (PEFT's lora_magnitude_vector),
    lora_scale = alpha / r, scale the adapter's 0-d weight."""
    return base_deltas.dora_forward(x, y, weight, bias, A, B, magnitude, lora_scale, scale)


@dora_delta.register_fake
def _(x, y, weight, bias, A, B, magnitude, lora_scale, scale):
    torch._check(A.dim() == 2 and B.dim() == 2 and weight.dim() == 2, lambda: "dora_delta: A, B, weight must be 2-D")
    torch._check(tuple(weight.shape) == (B.shape[0], A.shape[1]) and B.shape[1] == A.shape[0],
                 lambda: f"dora_delta: weight {tuple(weight.shape)} != [out, in] of B {tuple(B.shape)} A {tuple(A.shape)}")
    torch._check(tuple(magnitude.shape) == (B.shape[0],), lambda: "dora_delta: magnitude must be [out]")
    torch._check(x.shape[-1] == A.shape[1] and y.shape[-1] == B.shape[0], lambda: "dora_delta: x / y features != in / out")
    return torch.empty_like(y)


@torch.library.custom_op("splice::ia3_scale", mutates_args=())
def ia3_scale(y: torch.Tensor, l: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """IA3 (https://arxiv.org/abs/2205.05638) on a layer's output: ``y·l``, l ``[out]`` (recomputes:
    the result replaces the base output ``y``)."""
    return base_deltas.ia3_scale_forward(y, l, scale)


@torch.library.custom_op("splice::ia3_ff_linear", mutates_args=())
def ia3_ff_linear(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """IA3 on a feedforward layer's input: ``linear(x·l, W, b)``, l ``[in]`` (recomputes the layer;
    ``y``, the base output it replaces, is not read)."""
    return base_deltas.ia3_ff_forward(y, x, weight, bias, l, scale)


@torch.library.custom_op("splice::bat_linear", mutates_args=())
def bat_linear(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """MiSS's Bat (https://arxiv.org/abs/2409.15371): ``linear(x, W + ΔW, b)``, ``ΔW_ij = W_ij B_i + B_i``
    on ``r×r`` blocks of ``W [out, in]`` with ``block [out/r, r, r]`` (recomputes the layer)."""
    return base_deltas.bat_forward(y, x, weight, bias, block, scale)


@torch.library.custom_op("splice::ssf_delta", mutates_args=())
def ssf_delta(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """SSF (https://arxiv.org/abs/2210.08823): ``y·γ + β`` as ``y + (γ - 1)·y + β``, γ, β ``[out]``."""
    return base_deltas.scale_shift_forward(y, gamma, beta, scale)


def _channel_fake(name, y, *vectors):
    torch._check(all(v.dim() == 1 and v.shape[0] == y.shape[-1] for v in vectors),
                 lambda: f"{name}: vectors must be [{y.shape[-1]}] (the output features)")
    return torch.empty_like(y)


ia3_scale.register_fake(lambda y, l, scale: _channel_fake("ia3_scale", y, l))
ssf_delta.register_fake(lambda y, gamma, beta, scale: _channel_fake("ssf_delta", y, gamma, beta))


def _recompute_fake(name, y, x, weight, bias):
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1] and y.shape[-1] == weight.shape[0],
                 lambda: f"{name}: x / y features {x.shape[-1]} / {y.shape[-1]} != weight's [out, in] {tuple(weight.shape)}")
    torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],), lambda: f"{name}: bias must be [out]")
    return torch.empty_like(y)


@ia3_ff_linear.register_fake
def _(y, x, weight, bias, l, scale):
    torch._check(tuple(l.shape) == (weight.shape[1],), lambda: "ia3_ff_linear: l must be [in] of weight")
    return _recompute_fake("ia3_ff_linear", y, x, weight, bias)


@bat_linear.register_fake
def _(y, x, weight, bias, block, scale):
    torch._check(block.dim() == 3 and block.shape[1] == block.shape[2], lambda: "bat_linear: block must be [out/r, r, r]")
    torch._check(weight.shape[0] == block.shape[0] * block.shape[1] and weight.shape[1] % block.shape[2] == 0,
                 lambda: "bat_linear: weight is not a grid of r x r blocks matching block")
    return _recompute_fake("bat_linear", y, x, weight, bias)


autograd_by_recompute(dora_delta, base_deltas.dora_forward)
autograd_by_recompute(ia3_scale, base_deltas.ia3_scale_forward)
autograd_by_recompute(ia3_ff_linear, base_deltas.ia3_ff_forward)
autograd_by_recompute(bat_linear, base_deltas.bat_forward)
autograd_by_recompute(ssf_delta, base_deltas.scale_shift_forward)


def _base_layer(s: Sampler):
    """``(x, y, weight, bias)`` of a small float linear, ``y`` its output."""
    x, w, b = s(2, 3, 8), s(6, 8), s(6)
    return x, F.linear(x, w, b), w, b


def _dora_sample():
    s = Sampler()
    x, y, w, b = _base_layer(s)
    return x, y, w, b, s(2, 8, grad=True), s(6, 2, grad=True), s(6, grad=True), s.scalar(0.5), s.scalar(1.0)


def _ia3_sample():
    s = Sampler()
    return s(2, 3, 6), s(6, grad=True), s.scalar(1.0)


def _ia3_ff_sample():
    s = Sampler()
    x, y, w, b = _base_layer(s)
    return y, x, w, b, s(8, grad=True), s.scalar(1.0)


def _bat_sample():
    s = Sampler()
    x, y, w, b = _base_layer(s)
    return y, x, w, b, s(3, 2, 2, grad=True), s.scalar(1.0)


def _ssf_sample():
    s = Sampler()
    return s(2, 3, 6), s(6, grad=True), s(6, grad=True), s.scalar(1.0)


for _op, _roles, _sample in (
        (dora_delta, {4: "adapter", 5: "adapter", 6: "adapter", 7: "adapter_scale", 8: "adapter_scale"}, _dora_sample),
        (ia3_scale, {1: "adapter", 2: "adapter_scale"}, _ia3_sample),
        (ia3_ff_linear, {2: "weight", 3: "bias", 4: "adapter", 5: "adapter_scale"}, _ia3_ff_sample),
        (bat_linear, {2: "weight", 3: "bias", 4: "adapter", 5: "adapter_scale"}, _bat_sample),
        (ssf_delta, {1: "adapter", 2: "adapter", 3: "adapter_scale"}, _ssf_sample)):
    register_op(_op, family="adapters", roles=_roles, trainable=True, sample_inputs=_sample,
                translations={"onnx": f"{ONNX}:{_op._name}"})
