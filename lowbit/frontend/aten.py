"""ATen → core dialect: which ATen ops the frontend turns into typed ``core`` ops.

Each rule binds the call to the op's schema (names and defaults) and either returns the core
op, its operands and attributes, or ``None`` when this call does not fit (it then stays an
opaque ``aten.*`` node, which still runs and exports).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Converted = tuple[str, list, dict] | None
_RULES: dict[str, Callable[[dict], Converted]] = {}


def bind(target: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by schema name, defaults filled in."""
    out = {}
    schema_args = target._schema.arguments
    for i, a in enumerate(schema_args):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def rule(*names: str):
    def wrap(fn: Callable[[dict], Converted]) -> Callable[[dict], Converted]:
        for n in names:
            _RULES[n] = fn
        return fn

    return wrap


def convert(name: str, target: torch._ops.OpOverload, args: tuple, kwargs: dict,
            is_tensor: Callable[[object], bool]) -> Converted:
    fn = _RULES.get(name)
    if fn is None:
        return None
    a = bind(target, args, kwargs)
    a["__is_tensor__"] = is_tensor
    return fn(a)


def _ints(value, n: int) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return tuple(value) * (n // len(value)) if len(value) in (1, n) else None
    return None


@rule("aten.linear.default")
def _linear(a: dict) -> Converted:
    return "core.linear", [a["input"], a["weight"], a.get("bias")], {}


@rule("aten.matmul.default")
def _matmul(a: dict) -> Converted:
    return "core.matmul", [a["self"], a["other"]], {}


@rule("aten.conv2d.default")
def _conv2d(a: dict) -> Converted:
    stride, padding, dilation = (_ints(a[k], 2) for k in ("stride", "padding", "dilation"))
    if stride is None or padding is None or dilation is None:
        return None
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": int(a["groups"])}
    return "core.conv2d", [a["input"], a["weight"], a.get("bias")], attrs


@rule("aten.embedding.default")
def _embedding(a: dict) -> Converted:
    return "core.embedding", [a["weight"], a["indices"]], {}


@rule("aten.layer_norm.default")
def _layer_norm(a: dict) -> Converted:
    shape = _ints(a["normalized_shape"], len(a["normalized_shape"]))
    if shape is None:
        return None
    attrs = {"normalized_shape": shape, "eps": float(a["eps"])}
    return "core.layer_norm", [a["input"], a.get("weight"), a.get("bias")], attrs


@rule("aten.rms_norm.default")
def _rms_norm(a: dict) -> Converted:
    if len(a["normalized_shape"]) != 1 or a.get("eps") is None:
        return None
    return "core.rms_norm", [a["input"], a.get("weight")], {"eps": float(a["eps"])}


@rule("aten._native_batch_norm_legit_no_training.default")
def _batch_norm_legit(a: dict) -> Converted:
    operands = [a["input"], a.get("weight"), a.get("bias"), a["running_mean"], a["running_var"]]
    return "core.batch_norm", operands, {"eps": float(a["eps"])}


@rule("aten.batch_norm.default")
def _batch_norm(a: dict) -> Converted:
    if a["training"]:
        return None
    return _batch_norm_legit(a)


@rule("aten.gelu.default")
def _gelu(a: dict) -> Converted:
    return "core.gelu", [a["self"]], {"approximate": a.get("approximate", "none")}


for _op in ("relu", "silu", "tanh", "sigmoid"):
    rule(f"aten.{_op}.default")(lambda a, _op=_op: (f"core.{_op}", [a["self"]], {}))


@rule("aten.softmax.int")
def _softmax(a: dict) -> Converted:
    return None if a.get("dtype") is not None else ("core.softmax", [a["self"]], {"dim": a["dim"]})


@rule("aten._softmax.default")
def _softmax_internal(a: dict) -> Converted:
    return None if a["half_to_float"] else ("core.softmax", [a["self"]], {"dim": a["dim"]})


@rule("aten.scaled_dot_product_attention.default")
def _sdpa(a: dict) -> Converted:
    if a.get("dropout_p", 0.0) != 0.0:
        return None
    scale = a.get("scale")
    attrs = {"causal": bool(a.get("is_causal", False)), "scale": None if scale is None else float(scale),
             "gqa": bool(a.get("enable_gqa", False))}
    return "core.sdpa", [a["query"], a["key"], a["value"], a.get("attn_mask")], attrs


def _binary(core_op: str):
    def convert_binary(a: dict) -> Converted:
        is_tensor = a["__is_tensor__"]
        if not (is_tensor(a["self"]) and is_tensor(a["other"])) or a.get("alpha", 1) != 1:
            return None
        return core_op, [a["self"], a["other"]], {}

    return convert_binary


for _op in ("add", "sub", "mul", "div"):
    rule(f"aten.{_op}.Tensor")(_binary(f"core.{_op}"))
