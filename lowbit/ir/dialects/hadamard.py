"""Hadamard matrices and transforms: n = 2^k (Sylvester) and n = m·2^k with a base m from
Paley's constructions (m = q + 1 for a prime q ≡ 3 mod 4: 12, 20, 108, 140; m = 2(q + 1) for a
prime q ≡ 1 mod 4: 36, 60), so H_n = H_m ⊗ H_{2^k}.

``hadamard_transform(x)`` applies H_n/√n to the last dim in O(n log n) for the power-of-two
part plus an m×m product for the base: (H_m ⊗ H_{2^k}) x = vec(H_m · X · H_{2^k}) with X the
m × 2^k reshape of x. The result is orthonormal: applying it twice gives back x.
"""

from __future__ import annotations

import functools
import math

import torch

BASES = (1, 12, 20, 36, 60, 108, 140)


def _legendre(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    return torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _legendre(q)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime ≡ 3 mod 4."""
    qm = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = qm
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q prime ≡ 1 mod 4."""
    qm = _jacobsthal(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = qm
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=None)
def base_matrix(m: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of base order m (1, 12, 20, 36, 60, 108, 140)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if (m - 1) % 4 == 3 and _is_prime(m - 1):
        return _paley1(m - 1)
    q = m // 2 - 1
    if m % 2 == 0 and q % 4 == 1 and _is_prime(q):
        return _paley2(q)
    raise ValueError(f"no Hadamard construction for base {m}")


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def factor(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k and m a supported base; ValueError if none."""
    for m in BASES:
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            return m, n // m
    raise ValueError(f"no Hadamard matrix of size {n}: sizes are m·2^k with m in {BASES}")


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense ±1 Hadamard matrix of order n (H·Hᵀ = n·I)."""
    m, p = factor(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return torch.kron(base_matrix(m), h)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x · H_nᵀ/√n over the last dim (H_n = H_m ⊗ H_{2^k}), fast for the 2^k part."""
    from lowbit.ir.dialects.rotate import fast_hadamard

    n = x.shape[-1]
    m, p = factor(n)
    if m == 1:
        return fast_hadamard(x)
    y = fast_hadamard(x.reshape(*x.shape[:-1], m, p))  # H_{2^k}/√p on the inner dim
    base = (base_matrix(m) / math.sqrt(m)).to(x.dtype)
    y = torch.einsum("ij,...jk->...ik", base, y)  # H_m/√m on the outer dim
    return y.reshape(x.shape)
