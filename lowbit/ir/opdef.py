"""Op declarations. Each op is declared once: operands, typed attributes, type inference,
extra verification and a torch reference implementation (together, the interpreter).

    @define("core.relu", operands=["input"], infer=same_as_input)
    def relu(input): return torch.relu(input)

Ops whose name starts with an opaque prefix (``aten.``, ``operator.``) are ATen (or Python
operator) calls that the frontend did not canonicalize. They share one definition: their
``args`` attribute says how to call the torch function, and their types come from tracing.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lowbit.errors import VerifyError
from lowbit.ir.attrs import AttrKind, AttrValue, CallArgs, EnumAttr, Ref
from lowbit.ir.types import DType, Type

OPAQUE_PREFIXES = ("aten.", "operator.", "ops.", "torch.sym_")  # ops.<namespace>: another library's torch custom op
_REQUIRED = object()


@dataclass(frozen=True)
class OperandDef:
    name: str
    optional: bool = False


@dataclass(frozen=True)
class AttrDef:
    name: str
    kind: AttrKind
    default: object = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


InferFn = Callable[[Sequence, dict], list[Type]]
VerifyFn = Callable[[object], None]


@dataclass(frozen=True)
class OpDef:
    name: str
    operands: tuple[OperandDef, ...]
    attrs: tuple[AttrDef, ...]
    reference: Callable[..., object]
    infer: InferFn | None = None
    verify: VerifyFn | None = None
    pure: bool = True
    doc: str = field(default="", compare=False)

    def attr(self, name: str) -> AttrDef:
        for a in self.attrs:
            if a.name == name:
                return a
        raise KeyError(name)

    def full_attrs(self, attrs: dict[str, AttrValue | CallArgs]) -> dict:
        """Attributes with defaults filled in."""
        out = {a.name: a.default for a in self.attrs if not a.required}
        out.update(attrs)
        return out


_REGISTRY: dict[str, OpDef] = {}


def _parse_operands(spec: Sequence[str]) -> tuple[OperandDef, ...]:
    return tuple(OperandDef(s.rstrip("?"), s.endswith("?")) for s in spec)


def define(name: str, operands: Sequence[str] = (), attrs: Sequence[AttrDef] = (),
           infer: InferFn | None = None, verify: VerifyFn | None = None, pure: bool = True):
    """Declare an op; the decorated function is its reference implementation.

    Operands ending in ``?`` are optional. The reference receives operands positionally
    (``None`` for an absent optional one) and attributes as keywords.
    """

    def wrap(fn: Callable[..., object]) -> Callable[..., object]:
        if name in _REGISTRY:
            raise ValueError(f"op {name} is declared twice")
        _REGISTRY[name] = OpDef(name, _parse_operands(operands), tuple(attrs), fn, infer,
                                verify, pure, fn.__doc__ or "")
        return fn

    return wrap


def is_opaque(name: str) -> bool:
    return name.startswith(OPAQUE_PREFIXES)


_VIEWS = ("aten.view.default", "aten._unsafe_view.default")


def resolve_target(name: str) -> Callable[..., object]:
    """The torch/Python callable an opaque op name stands for (``aten.view.default``)."""
    if name.startswith("operator."):
        fn = getattr(operator, name.split(".", 1)[1], None)
        if fn is None:
            raise VerifyError(f"unknown Python operator {name!r}")
        return fn
    if name.startswith("torch.sym_"):  # torch.sym_max, sym_min, ...: arithmetic on sizes
        fn = getattr(torch, name.split(".", 1)[1], None)
        if fn is None:
            raise VerifyError(f"unknown torch size function {name!r}")
        return fn
    if name in _VIEWS:  # graphs are functional: a view is a reshape, whatever the layout the
        return torch.ops.aten.reshape.default  # run gives (a GPU attention's output, say)
    parts = name.split(".")
    if parts[0] == "ops" and len(parts) == 4:  # ops.<namespace>.<op>.<overload>
        namespace, parts = parts[1], parts[1:]
    elif len(parts) == 3:
        namespace = "aten"
    else:
        raise VerifyError(f"opaque op {name!r} must be written aten.<op>.<overload> or "
                          "ops.<namespace>.<op>.<overload>")
    try:
        packet = getattr(getattr(torch.ops, namespace), parts[1])
        return getattr(packet, parts[2])
    except (AttributeError, RuntimeError):
        raise VerifyError(f"torch has no op {name!r} (is the library that defines it imported?)") from None


def _opaque_reference(*operands, __target__, args: CallArgs):
    return __target__(*fill_call(args.args, operands), **{k: fill_call(v, operands) for k, v in args.kwargs})


def fill_call(template: AttrValue, operands: Sequence) -> object:
    """Substitute operand values for the ``Ref`` entries of a call template."""
    if isinstance(template, Ref):
        return operands[template.index]
    if isinstance(template, tuple):
        return [fill_call(t, operands) for t in template]
    if isinstance(template, DType):
        return template.storage
    if isinstance(template, EnumAttr):
        return _enum_to_torch(template)
    return template


def _enum_to_torch(attr: EnumAttr) -> object:
    if attr.kind == "device":
        return torch.device(attr.value)
    return getattr(torch, attr.value)


_OPAQUE = OpDef("aten.*", (), (AttrDef("args", AttrKind.CALL),), _opaque_reference,
                doc="An ATen or Python operator call kept as is; runs through torch.")


def lookup(name: str) -> OpDef:
    """The declaration of op ``name``; unknown names get close suggestions."""
    if is_opaque(name):
        return _OPAQUE
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise VerifyError(f"unknown op {name!r}{hint}") from None


def registered_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)


def infer_types(name: str, operands: Sequence, attrs: dict) -> list[Type]:
    opdef = lookup(name)
    if opdef.infer is None:
        raise VerifyError(f"{name} cannot infer its result types; give them explicitly")
    types = [o.type if o is not None else None for o in operands]
    return opdef.infer(types, opdef.full_attrs(attrs))
