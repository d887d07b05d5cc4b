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


def _field(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e for e in (1, 2), p prime; None otherwise."""
    if _is_prime(q):
        return q, 1
    p = math.isqrt(q)
    return (p, 2) if p * p == q and _is_prime(p) else None


def _jacobsthal(q: int) -> list[list[int]]:
    """Q[i][j] = χ(a_j − a_i) over GF(q), χ the quadratic character. Elements of GF(p²) are
    a + b·t with t² = r, r a non-residue mod p, numbered a + p·b."""
    p, e = _field(q)
    r = next((r for r in range(2, p) if pow(r, (p - 1) // 2, p) == p - 1), 0) if e == 2 else 0
    elems = [(i % p, i // p) for i in range(q)]

    def mul(x, y):
        return (x[0] * y[0] + r * x[1] * y[1]) % p, (x[0] * y[1] + x[1] * y[0]) % p

    squares = {mul(x, x) for x in elems if x != (0, 0)}
    chi = {x: 0 if x == (0, 0) else 1 if x in squares else -1 for x in elems}
    return [[chi[((y[0] - x[0]) % p, (y[1] - x[1]) % p)] for y in elems] for x in elems]


def _kron(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    return [[x * y for x in ra for y in rb] for ra in a for rb in b]


def _paley1(q: int) -> list[list[int]]:
    """Order q + 1, q prime ≡ 3 mod 4: [[0, 1ᵀ], [−1, Q]] + I."""
    jq = _jacobsthal(q)
    s = [[0] + [1] * q] + [[-1] + row for row in jq]
    return [[v + (i == j) for j, v in enumerate(row)] for i, row in enumerate(s)]


def _paley2(q: int) -> list[list[int]]:
    """Order 2(q + 1), q a prime or prime square ≡ 1 mod 4: C ⊗ A + I ⊗ B."""
    jq = _jacobsthal(q)
    c = [[0] + [1] * q] + [[1] + row for row in jq]
    eye = [[int(i == j) for j in range(q + 1)] for i in range(q + 1)]
    ca, ib = _kron(c, [[1, -1], [-1, -1]]), _kron(eye, [[1, 1], [1, -1]])
    return [[x + y for x, y in zip(ra, rb)] for ra, rb in zip(ca, ib)]


def base_matrix(m: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of base order m (one of ``BASES``), a fresh tensor each call."""
    return torch.tensor(_base_rows(m), dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _base_rows(m: int) -> tuple[tuple[int, ...], ...]:
    # built and cached in plain Python: tensors made while torch.export traces are fake ones
    if m == 1:
        h = [[1]]
    elif (m - 1) % 4 == 3 and _is_prime(m - 1):
        h = _paley1(m - 1)
    elif m % 2 == 0 and (m // 2 - 1) % 4 == 1 and _field(m // 2 - 1):
        h = _paley2(m // 2 - 1)
    else:
        raise ValueError(f"no Hadamard construction for base {m}")
    return tuple(tuple(row) for row in h)


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

    if x.dtype in (torch.float16, torch.bfloat16):
        # the butterflies normalize at the end: half-precision sums of √n-scaled values overflow
        return hadamard_transform(x.float()).to(x.dtype)
    n = x.shape[-1]
    m, p = factor(n)
    if m == 1:
        return fast_hadamard(x)
    y = fast_hadamard(x.reshape(*x.shape[:-1], m, p))  # H_{2^k}/√p on the inner dim
    base = (base_matrix(m) / math.sqrt(m)).to(x.dtype)
    y = torch.einsum("ij,...jk->...ik", base, y)  # H_m/√m on the outer dim
    return y.reshape(x.shape)
