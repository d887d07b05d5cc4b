"""Attribute values: the typed constants an op carries besides its operands.

An attribute is one of ``int``, ``float``, ``bool``, ``str``, ``None``, a ``DType``, an
``EnumAttr`` (torch's device/layout/memory-format literals), a tuple of attributes, or, inside
an opaque op's ``CallArgs``, a ``Ref`` to one of the node's operands.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from lowbit.ir.types import DType


@dataclass(frozen=True)
class Ref:
    """Operand ``index`` of the node, placed inside a call template."""

    index: int


ENUM_KINDS = ("device", "layout", "memory_format")


@dataclass(frozen=True)
class EnumAttr:
    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in ENUM_KINDS:
            raise ValueError(f"unknown enum attribute kind {self.kind!r}; allowed: {ENUM_KINDS}")


AttrValue = int | float | bool | str | None | DType | EnumAttr | Ref | tuple["AttrValue", ...]


@dataclass(frozen=True)
class CallArgs:
    """How an opaque op calls its torch function: positional and keyword arguments, with
    operands placed through ``Ref``."""

    args: tuple[AttrValue, ...]
    kwargs: tuple[tuple[str, AttrValue], ...] = ()

    def refs(self) -> list[Ref]:
        out: list[Ref] = []
        _collect_refs(self.args, out)
        _collect_refs(tuple(v for _, v in self.kwargs), out)
        return out


def map_literals(call: CallArgs, fn) -> CallArgs:
    """``call`` with ``fn`` applied to each of its literal arguments (operand ``Ref`` s left as
    they are, tuples entered)."""
    return CallArgs(_map(call.args, fn), tuple((k, _map(v, fn)) for k, v in call.kwargs))


def _map(value: AttrValue, fn) -> AttrValue:
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    return value if isinstance(value, Ref) else fn(value)


def on_device(call: CallArgs, device: str) -> CallArgs:
    """``call`` with every device literal replaced by ``device`` (a graph traced on one device,
    run on another: the tensors it creates belong where its other tensors are)."""
    return map_literals(call, lambda v: EnumAttr("device", device)
                        if isinstance(v, EnumAttr) and v.kind == "device" else v)


def within(call: CallArgs, limit: float) -> CallArgs:
    """``call`` with finite float literals clamped to ±``limit`` (a float32 fill value such as
    its minimum, run in float16: the model's code would have used float16's)."""
    return map_literals(call, lambda v: max(-limit, min(limit, v))
                        if isinstance(v, float) and math.isfinite(v) else v)


def _collect_refs(value: AttrValue, out: list[Ref]) -> None:
    if isinstance(value, Ref):
        out.append(value)
    elif isinstance(value, tuple):
        for item in value:
            _collect_refs(item, out)


class AttrKind(enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    DTYPE = "dtype"
    INTS = "ints"
    OPT_INT = "int or none"
    OPT_FLOAT = "float or none"
    CALL = "call arguments"


def attr_matches(kind: AttrKind, value: object) -> bool:
    """Whether ``value`` is a valid attribute of ``kind``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    checks = {
        AttrKind.INT: lambda: is_int,
        AttrKind.FLOAT: lambda: isinstance(value, float),
        AttrKind.BOOL: lambda: isinstance(value, bool),
        AttrKind.STR: lambda: isinstance(value, str),
        AttrKind.DTYPE: lambda: isinstance(value, DType),
        AttrKind.INTS: lambda: isinstance(value, tuple)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        AttrKind.OPT_INT: lambda: value is None or is_int,
        AttrKind.OPT_FLOAT: lambda: value is None or isinstance(value, float),
        AttrKind.CALL: lambda: isinstance(value, CallArgs),
    }
    return checks[kind]()
