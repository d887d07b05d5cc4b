"""The ``rotate`` dialect: orthogonal transforms applied online.

``rotate.hadamard`` multiplies the last dim by the normalized Hadamard matrix: y = x·H_nᵀ/√n
for any n (see ``hadamard``: Kronecker products of Paley bases and Sylvester's H_{2^k}, an
orthogonal substitute where no Hadamard matrix is built), with the O(n log n) butterfly for the
power-of-two part.
For n = 2^k, H is symmetric and (H/√n)² = I, so applying it twice gives back x.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import VerifyError
from lowbit.ir.dialects.infer import same_as_input, tensor
from lowbit.ir.opdef import define


def fast_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x · H/√n over the last dim by ``log2 n`` butterfly stages."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fast_hadamard needs a power-of-two size, got {n}")
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(n)).to(x.dtype)


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The dense ±1 Hadamard matrix of power-of-two size n (Sylvester's construction)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _hadamard_verify(node):
    shape = tensor(node.operands[0].type, "input").shape
    if not shape or isinstance(shape[-1], int) and shape[-1] < 1:
        raise VerifyError(f"rotate.hadamard: needs a last dim of size ≥ 1, got shape {list(shape)}")


@define("rotate.hadamard", operands=["input"], infer=same_as_input, verify=_hadamard_verify)
def hadamard(input):
    from lowbit.ir.dialects.hadamard import hadamard_transform

    y = hadamard_transform(input)
    if input.is_contiguous():
        return y
    # keep the input's memory layout (a transposed query/key): what follows may view it
    return torch.empty_like(input).copy_(y)
