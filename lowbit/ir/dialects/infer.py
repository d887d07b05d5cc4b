"""Shared type-inference helpers for op declarations (symbolic dims are strings)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowbit.errors import VerifyError
from lowbit.ir.types import Dim, DType, TensorType, Type


def tensor(t: Type | None, what: str) -> TensorType:
    if not isinstance(t, TensorType):
        raise VerifyError(f"{what} must be a tensor, got {t}")
    return t


def same_as_input(types: Sequence[Type | None], attrs: dict) -> list[Type]:
    return [tensor(types[0], "input")]


def broadcast_dims(a: Sequence[Dim], b: Sequence[Dim]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        elif isinstance(da, int) and isinstance(db, int):
            raise VerifyError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
        else:
            out.append(da if isinstance(da, str) else db)
    return tuple(reversed(out))


def promote(a: DType, b: DType) -> DType:
    if a == b:
        return a
    return DType.from_torch(torch.promote_types(a.storage, b.storage))


def binary(types: Sequence[Type | None], attrs: dict) -> list[Type]:
    a, b = tensor(types[0], "lhs"), tensor(types[1], "rhs")
    return [TensorType(broadcast_dims(a.shape, b.shape), promote(a.dtype, b.dtype))]


def dims_equal(a: Dim, b: Dim) -> bool:
    """False only when both dims are known and differ."""
    return a == b or not (isinstance(a, int) and isinstance(b, int))
