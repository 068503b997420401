"""Orthogonal rotations for ``quantize.rotate``: normalized Hadamard matrices of any order
that the Sylvester and Paley constructions reach, else a random orthogonal matrix.

``H_n = H_m ⊗ H_{2^k}`` (Kronecker) with ``n = m·2^k`` and ``H_m`` one of
``1`` (Sylvester, ``scipy.linalg.hadamard``), Paley I (``m = q + 1``, prime ``q ≡ 3 mod 4``) or
Paley II (``m = 2(q + 1)``, prime ``q ≡ 1 mod 4``); e.g. 576 = 72·8 (Paley I, q = 71),
1536 = 12·128 (q = 11), 4096 = 2^12. Divided by ``√n`` it is orthogonal. QuaRot
(https://arxiv.org/abs/2404.00456) uses the same Kronecker trick with stored 12×12/…/172×172
matrices; the Paley constructions give those orders without tables. Sizes none of these
reach fall back to ``Q`` from the QR decomposition of a seeded Gaussian matrix (signs fixed
so it is Haar-distributed), as SpinQuant's random-orthogonal start.
"""
from __future__ import annotations

import numpy as np
import torch


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = χ(j − i)``, χ the quadratic character mod prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _bordered(q: int, sign: int) -> np.ndarray:
    """``[[0, 1ᵀ], [sign·1, Q]]`` of order ``q + 1``."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = sign
    s[1:, 1:] = _jacobsthal(q)
    return s


def paley(m: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of order ``m`` by Paley I or II, or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return np.eye(m, dtype=np.int64) + _bordered(m - 1, -1)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        s = _bordered(q, 1)
        return np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]]) + np.kron(s, [[1, 1], [1, -1]])
    return None


def hadamard(n: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of order ``n`` (``H Hᵀ = n I``), or None when no construction here reaches it."""
    import scipy.linalg  # kept off the pass registry's import

    k = 0
    while n % (2 << k) == 0:
        k += 1
    for j in range(k, -1, -1):  # the largest power-of-two factor first: the smallest Paley part
        m = n >> j
        base = np.ones((1, 1), dtype=np.int64) if m == 1 else paley(m)
        if base is not None:
            return np.kron(base, scipy.linalg.hadamard(1 << j))
    return None


def rotation(n: int, gen: torch.Generator, random_signs: bool = True) -> tuple[torch.Tensor, str]:
    """An orthogonal ``[n, n]`` float64 matrix and how it was built (``"hadamard"`` or
    ``"random_orthogonal"``). With ``random_signs`` its rows get random ±1 signs (QuaRot's
    randomized Hadamard), drawn from ``gen``."""
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)), "random_orthogonal"
    q = torch.from_numpy(h).double() / n ** 0.5
    if random_signs:
        q = q * (torch.randint(0, 2, (n, 1), generator=gen, dtype=torch.float64) * 2 - 1)
    return q, "hadamard"
