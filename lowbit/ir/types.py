"""Types of IR values: tensors with (possibly symbolic) shapes and low-bit dtypes, and scalars.

A dimension is an ``int`` or a ``str`` naming a symbol (``batch``) or a symbolic expression
written without spaces (``2*seq``). Shapes are tuples of dimensions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

Dim = int | str


class DType(enum.Enum):
    """Element types. Sub-byte and fp8 types name how values are interpreted; the tensor that
    holds them at run time uses ``storage`` (int4 values live in int8 tensors)."""

    f64 = ("f64", torch.float64, 64)
    f32 = ("f32", torch.float32, 32)
    f16 = ("f16", torch.float16, 16)
    bf16 = ("bf16", torch.bfloat16, 16)
    f8e4m3 = ("f8e4m3", torch.float8_e4m3fn, 8)
    f8e5m2 = ("f8e5m2", torch.float8_e5m2, 8)
    i64 = ("i64", torch.int64, 64)
    i32 = ("i32", torch.int32, 32)
    i16 = ("i16", torch.int16, 16)
    i8 = ("i8", torch.int8, 8)
    u8 = ("u8", torch.uint8, 8)
    i4 = ("i4", torch.int8, 4)
    u4 = ("u4", torch.uint8, 4)
    bool = ("bool", torch.bool, 8)

    def __init__(self, short: str, storage: torch.dtype, bits: int) -> None:
        self.short = short
        self.storage = storage
        self.bits = bits

    @property
    def is_float(self) -> bool:
        return self.short.startswith(("f", "bf"))

    @property
    def is_integer(self) -> bool:
        return self.short.startswith(("i", "u"))

    @property
    def int_range(self) -> tuple[int, int]:
        """(min, max) representable value of an integer dtype."""
        if not self.is_integer:
            raise ValueError(f"{self.short} is not an integer dtype")
        if self.short.startswith("u"):
            return 0, 2**self.bits - 1
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    @staticmethod
    def from_torch(dtype: torch.dtype) -> DType:
        try:
            return _FROM_TORCH[dtype]
        except KeyError:
            raise ValueError(f"lowbit has no dtype for torch dtype {dtype}") from None

    @staticmethod
    def parse(text: str) -> DType:
        try:
            return DType[text]
        except KeyError:
            allowed = ", ".join(d.short for d in DType)
            raise ValueError(f"unknown dtype {text!r}; allowed: {allowed}") from None


_FROM_TORCH: dict[torch.dtype, DType] = {}
for _d in DType:
    # the first dtype listed for a storage type wins (i8 over i4, u8 over u4)
    _FROM_TORCH.setdefault(_d.storage, _d)


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: DType

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        if not self.is_static:
            raise ValueError(f"shape {self} is symbolic")
        n = 1
        for d in self.shape:
            n *= d  # type: ignore[operator]
        return n

    def nbytes(self) -> int:
        return (self.numel() * self.dtype.bits + 7) // 8

    def __str__(self) -> str:
        return f"{self.dtype.short}[{','.join(str(d) for d in self.shape)}]"


class ScalarKind(enum.Enum):
    int = "int"
    float = "float"
    bool = "bool"


@dataclass(frozen=True)
class ScalarType:
    """A scalar computed at run time, such as a symbolic size (``aten.sym_size``)."""

    kind: ScalarKind

    def __str__(self) -> str:
        return f"!{self.kind.value}"


@dataclass(frozen=True)
class NoneType:
    """The type of a result that holds nothing (an op returning None in one tuple slot)."""

    def __str__(self) -> str:
        return "!none"


Type = TensorType | ScalarType | NoneType
