"""Binary-coded quantization (BCQ), the weight format of ShiftAddLLM (https://arxiv.org/abs/2406.05981):

    W[n, k] ≈ Σ_{i < bits} α_i[n, k // group_size] · B_i[n, k],   B_i ∈ {−1, +1}

Storage (``splice::bcq_linear``): ``codes`` uint8 ``[bits, N, K/8]``, bit-plane ``i`` of row ``n``
packed 1 bit per entry, least significant bit first (``quant/packing.py``; a set bit is +1), so
byte ``j`` holds entries ``8j..8j+7``; ``scales`` ``[bits, N, K/group_size]``. ``group_size`` is a
multiple of 8, so every code byte lies inside one scale group (the lookup-table form needs it).

Fitting (``fit``), per row group ``w [gs]``: two starts — greedy residual binarization
(``α_i = mean|r|``, ``B_i = sign(r)``, ``r −= α_i B_i``) and the uniform symmetric grid
(``α_i = 2^i·s``) — each refined by ``iters`` rounds of alternating least squares: given the codes,
α by least squares (a ``bits × bits`` normal system per group); given α, each entry's code by
exhaustive search over the ``2^bits`` sign combinations (the nearest of the sorted levels
``Σ ±α_i``: exact, not greedy). The start with the smaller error is kept per group. ``pow2``
rounds every α to a signed power of two (multiplication by α becomes a shift). With at least as
many bit-planes as entries per group (``bits ≥ group_size``) the planes are Hadamard rows and α
solves the group exactly.
"""
from __future__ import annotations

import itertools

import torch

from splice.kernels.quant.packing import pack_bits, unpack_bits

MAX_BITS = 8


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """``[bits, N, K]`` of ±1 (or bool: True = +1) -> uint8 codes ``[bits, N, K/8]``."""
    return pack_bits((signs > 0).to(torch.uint8), 1)


def unpack_signs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[bits, N, K/8]`` -> float ±1 ``[bits, N, K]``."""
    return unpack_bits(codes, 1, codes.shape[-1] * 8).float() * 2 - 1


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Packed storage -> float32 ``W [N, K]``."""
    signs = unpack_signs(codes)
    alpha = scales.float().repeat_interleave(group_size, dim=-1)
    return (signs * alpha).sum(0)


# ----------------------------------------------------------------------------- fitting


def _sign_combos(bits: int) -> torch.Tensor:
    """Every sign vector ``[2^bits, bits]`` (±1)."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=bits)))


def _least_squares(signs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """α ``[R, bits]`` minimizing ``‖w − αᵀ signs‖`` per row (``signs [R, bits, gs]``, ``w [R, gs]``)."""
    gram = signs @ signs.transpose(1, 2)
    ridge = 1e-6 * signs.shape[-1] * torch.eye(signs.shape[1])  # duplicate planes: split their scale
    return torch.linalg.solve(gram + ridge, (signs @ w.unsqueeze(-1))).squeeze(-1)


def round_pow2(alpha: torch.Tensor) -> torch.Tensor:
    """Each α to the signed power of two nearest in log scale (0 stays 0)."""
    mag = alpha.abs()
    return torch.where(mag > 0, alpha.sign() * torch.exp2(torch.round(torch.log2(mag.clamp(min=1e-30)))), alpha)


def sorted_levels(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every level ``Σ α_i s_i`` of each row of ``alpha [R, bits]``, sorted ``[R, 2^bits]``, with the
    sign combination of each (``order`` into ``combos [2^bits, bits]``)."""
    combos = _sign_combos(alpha.shape[1])
    levels, order = torch.sort(alpha @ combos.T, dim=-1)
    return levels, order, combos


def nearest_codes(w: torch.Tensor, alpha: torch.Tensor, table=None) -> torch.Tensor:
    """The signs ``[R, bits, gs]`` whose level ``Σ α_i s_i`` is nearest to each entry of ``w [R, gs]``
    (exhaustive over the ``2^bits`` combinations, by binary search in the sorted levels;
    ``table``: ``sorted_levels(alpha)`` if already computed)."""
    levels, order, combos = sorted_levels(alpha) if table is None else table
    pos = torch.searchsorted(levels, w.contiguous()).clamp(1, levels.shape[1] - 1)
    lo, hi = levels.gather(1, pos - 1), levels.gather(1, pos)
    pick = order.gather(1, torch.where((w - lo).abs() <= (hi - w).abs(), pos - 1, pos))
    return combos[pick].transpose(1, 2)                               # [R, bits, gs]


def _greedy(w: torch.Tensor, bits: int) -> torch.Tensor:
    r, alphas = w.clone(), []
    for _ in range(bits):
        a = r.abs().mean(-1)
        r -= a.unsqueeze(-1) * torch.where(r >= 0, 1.0, -1.0)
        alphas.append(a)
    return torch.stack(alphas, -1)


def _grid(w: torch.Tensor, bits: int) -> torch.Tensor:
    step = w.abs().amax(-1, keepdim=True) / (2 ** bits - 1)
    return step * 2.0 ** torch.arange(bits, dtype=w.dtype)


def _refine(w: torch.Tensor, alpha: torch.Tensor, iters: int, pow2: bool):
    """``iters`` ALS rounds from ``alpha``; a group whose codes did not change is done (its α given
    those codes is what it was), so later rounds only touch the groups still moving."""
    if pow2:
        alpha = round_pow2(alpha)
    signs = nearest_codes(w, alpha)
    if not pow2:
        alpha = _least_squares(signs, w)
    active = torch.arange(w.shape[0])
    for _ in range(iters):
        if not len(active):
            break
        wa = w[active]
        a = _least_squares(signs[active], wa)
        if pow2:
            a = round_pow2(a)
        new = nearest_codes(wa, a)
        moved = (new != signs[active]).flatten(1).any(1)
        alpha[active] = _least_squares(new, wa) if not pow2 else a
        signs[active] = new
        active = active[moved]
    return alpha, signs


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fit_groups(w: torch.Tensor, bits: int, iters: int = 10, pow2: bool = False, signs0: torch.Tensor | None = None):
    """BCQ of each row of ``w [R, gs]``: α ``[R, bits]`` and signs ``[R, bits, gs]`` (±1 floats);
    ``signs0`` (same shape) is one more start (a layer's current codes: a refit keeps what it had)."""
    w = w.float()
    rows, gs = w.shape
    if bits >= gs and gs & (gs - 1) == 0 and not pow2:  # as many planes as entries: exact
        h = _hadamard(gs)
        signs = torch.ones(rows, bits, gs)
        signs[:, :gs] = h
        alpha = torch.zeros(rows, bits)
        alpha[:, :gs] = w @ h.T / gs
        return alpha, signs
    best = None
    starts = [_greedy(w, bits), _grid(w, bits)] + ([] if signs0 is None else [_least_squares(signs0, w)])
    for start in starts:
        alpha, signs = _refine(w, start, iters, pow2)
        err = (w - (alpha.unsqueeze(-1) * signs).sum(1)).square().sum(-1)
        if best is None:
            best = (alpha, signs, err)
            continue
        better = err < best[2]
        best = (torch.where(better[:, None], alpha, best[0]), torch.where(better[:, None, None], signs, best[1]),
                torch.minimum(err, best[2]))
    return best[0], best[1]


def _group_rows(signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """±1 ``[bits, N, K]`` -> ``[N·G, bits, gs]`` (row groups, as ``fit_groups`` takes them)."""
    bits, n, k = signs.shape
    return signs.reshape(bits, n, k // group_size, group_size).permute(1, 2, 0, 3).reshape(-1, bits, group_size)


def fit(w: torch.Tensor, bits: int, group_size: int, iters: int = 10, pow2: bool = False,
        codes: torch.Tensor | None = None, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """BCQ of ``w [N, K]`` (``group_size`` divides ``K``): ``(codes uint8 [bits, N, K/8],
    scales float32 [bits, N, K/group_size])``, row groups fitted ``chunk`` at a time; ``codes``
    (the layer's current ones, if any) are one more start."""
    n, k = w.shape
    groups = k // group_size
    flat = w.detach().float().reshape(n * groups, group_size)
    start = None if codes is None else _group_rows(unpack_signs(codes), group_size)
    alphas, signs = [], []
    for r0 in range(0, flat.shape[0], chunk):
        s0 = None if start is None else start[r0:r0 + chunk]
        a, s = fit_groups(flat[r0:r0 + chunk], bits, iters, pow2, s0)
        alphas.append(a)
        signs.append(s > 0)
    alpha = torch.cat(alphas).reshape(n, groups, bits).permute(2, 0, 1).contiguous()
    sign = torch.cat(signs).reshape(n, groups, bits, group_size).permute(2, 0, 1, 3).reshape(bits, n, k)
    return pack_signs(sign), alpha
