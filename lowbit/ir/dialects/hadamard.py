"""Hadamard matrices and transforms: n = 2^k (Sylvester) and n = m·2^k with a base m from
Paley's constructions (m = q + 1 for a prime q ≡ 3 mod 4: 12, 20, 108, 140; m = 2(q + 1) for
q ≡ 1 mod 4 a prime or a prime's square, over GF(q): 28, 36, 52 (q = 25), 60), so
H_n = H_m ⊗ H_{2^k}. (40 = 20·2 is covered by the 2^k part; 156 and 172, which need
Williamson-type constructions, are not.)

``hadamard_transform(x)`` applies H_n/√n to the last dim in O(n log n) for the power-of-two
part plus an m×m product for the base: (H_m ⊗ H_{2^k}) x = vec(H_m · X · H_{2^k}) with X the
m × 2^k reshape of x. The result is orthonormal: applying it twice gives back x.
"""

from __future__ import annotations

import functools
import math

import torch

BASES = (1, 12, 20, 28, 36, 52, 60, 108, 140)


def _field(q: int) -> tuple[int, int]:
    """(p, e) with q = p^e for e in (1, 2), p prime; ValueError otherwise."""
    if _is_prime(q):
        return q, 1
    p = math.isqrt(q)
    if p * p == q and _is_prime(p):
        return p, 2
    raise ValueError(f"{q} is not a prime or the square of one")


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(a_j − a_i) over GF(q), χ the quadratic character. Elements of GF(p²) are
    a + b·t with t² = r, r a non-residue mod p, numbered a + p·b."""
    p, e = _field(q)
    if e == 1:
        elems = [(a, 0) for a in range(p)]
        mul = lambda x, y: ((x[0] * y[0]) % p, 0)  # noqa: E731
    else:
        r = next(r for r in range(2, p) if pow(r, (p - 1) // 2, p) == p - 1)
        elems = [(i % p, i // p) for i in range(q)]
        mul = lambda x, y: ((x[0] * y[0] + r * x[1] * y[1]) % p, (x[0] * y[1] + x[1] * y[0]) % p)  # noqa: E731
    squares = {mul(x, x) for x in elems if x != (0, 0)}
    index = {x: i for i, x in enumerate(elems)}
    chi = [0.0 if x == (0, 0) else 1.0 if x in squares else -1.0 for x in elems]
    out = torch.empty(q, q, dtype=torch.float64)
    for i, x in enumerate(elems):
        for j, y in enumerate(elems):
            out[i, j] = chi[index[((y[0] - x[0]) % p, (y[1] - x[1]) % p)]]
    return out


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime ≡ 3 mod 4."""
    qm = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = qm
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q a prime or prime square ≡ 1 mod 4."""
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
    """The ±1 Hadamard matrix of base order m (one of ``BASES``)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if (m - 1) % 4 == 3 and _is_prime(m - 1):
        return _paley1(m - 1)
    q = m // 2 - 1
    if m % 2 == 0 and q % 4 == 1 and (_is_prime(q) or _is_prime(math.isqrt(q)) and math.isqrt(q) ** 2 == q):
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
