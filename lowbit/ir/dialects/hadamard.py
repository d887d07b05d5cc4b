"""Hadamard matrices and transforms for every size n.

n = 2^a·o (o odd) is written as a Kronecker product H_n = B_1 ⊗ … ⊗ B_k ⊗ H_{2^j}: Sylvester's
H_{2^j} and base matrices B_i, each built for one piece of o times a few of the powers of two:

- Paley I, order q + 1 for a prime power q ≡ 3 (mod 4): [[0, 1ᵀ], [−1, Q]] + I;
- Paley II, order 2(q + 1) for a prime power q ≡ 1 (mod 4): C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]],

with Q the Jacobsthal matrix of GF(q), q = p^e for any e (GF(p^e) is built from an irreducible
polynomial found by search). ``plan(n)`` picks the pieces with the fewest multiply-adds per
element (the sum of the base orders): 11008 = 2^8·43 is Paley I(343) ⊗ H_32, 5632 = 2^9·11 is
Paley I(43) ⊗ H_128. Bases are at most ``MAX_BASE``. Where no split of o into such pieces
exists with the powers of two that n has (n odd, n = 2·odd, 156 = 4·39, 172 = 4·43, 4672 = 64·73),
the smallest odd factor r of o that cannot be covered gets a seeded random orthogonal R_r (R·Rᵀ = I) in the product instead: the transform is
then orthogonal but not a Hadamard matrix, and ``describe(n)`` says so.

``hadamard_transform(x)`` applies H_n/√n to the last dim: the butterflies for the 2^j part
(O(n log n)) and one small matrix product per base, (B ⊗ H) x = vec(B · X · Hᵀ) with X the
reshape of x. The result is orthonormal: for n = 2^j applying it twice gives back x.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch


# ---- number theory -------------------------------------------------------------------------

def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, e ≥ 1; None otherwise."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _odd_part(n: int) -> tuple[int, int]:
    a = (n & -n).bit_length() - 1
    return n >> a, a


# ---- GF(p^e) and the Paley constructions ---------------------------------------------------

def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists, lowest degree first, f monic."""
    a = a[:]
    for i in range(len(a) - 1, len(f) - 2, -1):
        c = a[i] % p
        if c:
            for j, fj in enumerate(f):
                a[i - len(f) + 1 + j] = (a[i - len(f) + 1 + j] - c * fj) % p
    return [x % p for x in a[:len(f) - 1]] + [0] * max(0, len(f) - 1 - len(a))


def _irreducible(p: int, e: int) -> list[int]:
    """A monic irreducible polynomial of degree e over GF(p): no monic factor of degree ≤ e/2."""
    def monic(deg: int):
        for k in range(p ** deg):
            yield [(k // p ** i) % p for i in range(deg)] + [1]
    for f in monic(e):
        if f[0] and not any(not any(_poly_mod(f, g, p)) for d in range(1, e // 2 + 1) for g in monic(d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")


def _quadratic_character(p: int, e: int) -> np.ndarray:
    """χ(x) for the elements x = Σ c_i t^i of GF(p^e), numbered Σ c_i p^i: 0, 1 (square) or −1."""
    q = p ** e
    digits = [[(x // p ** i) % p for i in range(e)] for x in range(q)]
    f = _irreducible(p, e) if e > 1 else [0, 1]
    chi = -np.ones(q, dtype=np.int8)
    chi[0] = 0
    for d in digits[1:]:
        sq = [0] * (2 * e - 1)
        for i, a in enumerate(d):
            for j, b in enumerate(d):
                sq[i + j] += a * b
        r = _poly_mod(sq, f, p) if e > 1 else [sq[0] % p]
        chi[sum(c * p ** i for i, c in enumerate(r))] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(a_j − a_i) over GF(q)."""
    p, e = prime_power(q)
    chi = _quadratic_character(p, e)
    x = np.arange(q)
    index = np.zeros((q, q), dtype=np.int64)
    for i in range(e):  # subtract digit by digit, mod p
        d = (x // p ** i) % p
        index += ((d[None, :] - d[:, None]) % p) * p ** i
    return chi[index]


def _paley1(q: int) -> np.ndarray:
    m = np.zeros((q + 1, q + 1), dtype=np.int8)
    m[0, 1:], m[1:, 0], m[1:, 1:] = 1, -1, _jacobsthal(q)
    return m + np.eye(q + 1, dtype=np.int8)


def _paley2(q: int) -> np.ndarray:
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    return (np.kron(c, np.array([[1, -1], [-1, -1]], dtype=np.int8))
            + np.kron(np.eye(q + 1, dtype=np.int8), np.array([[1, 1], [1, -1]], dtype=np.int8)))


@functools.lru_cache(maxsize=None)
def construction(m: int) -> str | None:
    """How a base of order m is built ('paley1:q', 'paley2:q'), or None if neither applies."""
    if m % 4:
        return None
    pp = prime_power(m - 1)
    if pp and (m - 1) % 4 == 3:
        return f"paley1:{m - 1}"
    q = m // 2 - 1
    if q % 4 == 1 and prime_power(q):
        return f"paley2:{q}"
    return None


@functools.lru_cache(maxsize=64)
def _base(kind: str, m: int) -> np.ndarray:
    """A base factor as float64 with B·Bᵀ = m·I: ±1 Hadamard, or √m·(random orthogonal)."""
    if kind == "orthogonal":
        rng = np.random.default_rng(m)  # seeded by the size: the same substitute everywhere
        q, r = np.linalg.qr(rng.standard_normal((m, m)))
        return q * np.sign(np.diagonal(r)) * math.sqrt(m)
    name, q = kind.split(":")
    return (_paley1 if name == "paley1" else _paley2)(int(q)).astype(np.float64)


# ---- plans ---------------------------------------------------------------------------------

KEEP_TWOS = (6, 4)
MAX_BASE = 1024  # a larger base costs more per element than the rotation is worth (a dense GEMM)

@dataclass(frozen=True)
class Plan:
    """H_n = B_1 ⊗ … ⊗ B_k ⊗ H_{power}; ``bases`` are (kind, order) pairs."""
    n: int
    bases: tuple[tuple[str, int], ...]
    power: int

    @property
    def exact(self) -> bool:
        """A Hadamard matrix (±1 entries, H·Hᵀ = n·I), not an orthogonal substitute."""
        return all(kind != "orthogonal" for kind, _ in self.bases)

    @property
    def base_order(self) -> int:
        return math.prod(m for _, m in self.bases)

    def describe(self) -> str:
        parts = [f"random orthogonal R_{m}" if kind == "orthogonal" else
                 f"Paley {'I' if kind.startswith('paley1') else 'II'}({kind.split(':')[1]})"
                 for kind, m in self.bases]
        if self.power > 1 or not parts:
            parts.append(f"H_{self.power}")
        what = "Hadamard" if self.exact else "orthogonal (not Hadamard)"
        return f"{what} {self.n} = {' ⊗ '.join(parts)}"


@functools.lru_cache(maxsize=None)
def _cover(o: int, twos: int) -> tuple[int, tuple[int, ...]] | None:
    """(cost, base orders) covering the odd number o with at most ``twos`` factors of 2,
    cheapest first (cost: the sum of the base orders); None if o cannot be covered."""
    if o == 1:
        return 0, ()
    smallest = next(d for d in range(3, o + 1, 2) if o % d == 0)
    best = None
    for d in range(smallest, o + 1, smallest):  # each split once: the piece holding o's smallest prime
        if o % d:
            continue
        for e in range(twos + 1):
            m = d << e
            if m > MAX_BASE or construction(m) is None:
                continue
            rest = _cover(o // d, twos - e)
            if rest is not None and (best is None or m + rest[0] < best[0]):
                best = (m + rest[0], (m, *rest[1]))
    return best


@functools.lru_cache(maxsize=None)
def plan(n: int) -> Plan:
    """How lowbit builds the n×n transform (see the module docstring)."""
    if n < 1:
        raise ValueError(f"no Hadamard transform of size {n}")
    o, twos = _odd_part(n)
    # keep H_64, else H_16, outside the bases where n allows it: the GPU kernels need that split
    found = next((c for keep in KEEP_TWOS if twos >= keep + 2 and (c := _cover(o, twos - keep))), None) \
        or _cover(o, twos)
    substitute = 1
    if found is None:  # the fewest odd factors in a random orthogonal, the rest Hadamard
        options = [(r, _cover(o // r, twos)) for r in range(3, o + 1, 2) if o % r == 0]
        substitute, found = next((r, c) for r, c in options if c is not None)
    bases = tuple((construction(m), m) for m in found[1])
    if substitute > 1:
        bases = (("orthogonal", substitute), *bases)
    return Plan(n, bases, n // math.prod(m for _, m in bases))


def factor(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k: the order of plan(n)'s bases and its power-of-two part."""
    p = plan(n)
    return p.base_order, p.power


def describe(n: int) -> str:
    return plan(n).describe()


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def base_factors(n: int) -> list[torch.Tensor]:
    """plan(n)'s base matrices (B·Bᵀ = m·I, float64), fresh tensors each call (tensors made
    while torch.export traces are fake: the arrays are built and cached outside torch)."""
    return [torch.tensor(_base(kind, m)) for kind, m in plan(n).bases]


def base_matrix(n: int) -> torch.Tensor:
    """B_1 ⊗ … ⊗ B_k of plan(n) (order ``factor(n)[0]``)."""
    out = torch.ones(1, 1, dtype=torch.float64)
    for b in base_factors(n):
        out = torch.kron(out, b)
    return out


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense matrix of plan(n), H·Hᵀ = n·I (±1 entries where ``plan(n).exact``)."""
    return torch.kron(base_matrix(n), _sylvester(plan(n).power))


def hadamard_transform(x: torch.Tensor, butterflies: bool = True) -> torch.Tensor:
    """x · H_nᵀ/√n over the last dim, one factor of plan(n) at a time. ``butterflies=False``
    multiplies by H_{2^k} as a matrix (what an ONNX export wants: two MatMuls, not log n stages)."""
    from lowbit.ir.dialects.rotate import fast_hadamard

    if x.dtype in (torch.float16, torch.bfloat16):
        # the butterflies normalize at the end: half-precision sums of √n-scaled values overflow
        return hadamard_transform(x.float(), butterflies).to(x.dtype)
    n = x.shape[-1]
    p = plan(n)
    lead = x.shape[:-1]
    orders = [m for _, m in p.bases]
    y = x.reshape(*lead, *orders, p.power)
    if butterflies:
        y = fast_hadamard(y)
    else:
        y = y @ (_sylvester(p.power) / math.sqrt(p.power)).to(x.device, x.dtype)  # symmetric
    for i, b in enumerate(base_factors(n)):
        axis = len(lead) + i
        y = (y.movedim(axis, -1) @ (b / math.sqrt(b.shape[0])).to(x.device, x.dtype).T).movedim(-1, axis)
    return y.reshape(x.shape)
