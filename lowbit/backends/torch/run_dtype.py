"""Running a graph in another float dtype than the one it was traced in.

A model traced in fp32 and then moved with ``.half()`` / ``.to(torch.bfloat16)`` has its
constants converted, but the graph no longer holds the casts that were no-ops when it was traced
(``cos.to(x.dtype)`` in a rotary embedding, ``weight * h.to(input_dtype)`` after a norm computed in
fp32). Without them, fp32 values computed from positions meet half-precision activations and
torch promotes the activations back to fp32, until a linear finds fp32 inputs and half weights.

The rule here is the one those casts expressed: on the activation path (everything computed
from a float input or an embedding lookup), an op whose float operands mix the run dtype with
another float dtype gets them all in the run dtype, as the model's own code would have cast
them. Values computed only from positions, masks and constants (rotary angles, say) keep the
precision they were traced in until they meet the activations; where they mix dtypes among
themselves (positions in fp32 times an inverse frequency now in fp16), they are promoted to the
wider, as torch's elementwise ops would do and a matmul does not. Explicit casts to fp32 on the
activation path (a norm's statistics) are kept too: nothing is cast until they meet a value of
the run dtype. On that path the traced float dtype in an op's attributes (a dequantize's output
dtype) becomes the run dtype, and float literals are clamped to its range (a masked_fill with
float32's minimum, which float16 cannot hold).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import torch

from lowbit.ir.graph import Graph
from lowbit.ir.opdef import is_opaque, lookup
from lowbit.ir.types import DType, TensorType

# fp8 codes are floating point to torch, but they are codes, not activations: never cast
WIDE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def quantizer_constants(graph: Graph) -> set[str]:
    """Names of the constants that are scales or zero points of quantized values: ``.half()``
    must not round them (a weight scale of 1e-5 is a subnormal in fp16)."""
    names = set()
    for node in graph.nodes:
        if is_opaque(node.op) or node.op == "core.constant":
            continue
        for operand, v in zip(lookup(node.op).operands, node.operands):
            if v is not None and v.producer is not None and v.producer.op == "core.constant" \
                    and ("scale" in operand.name or "zero" in operand.name):
                names.add(str(v.producer.attrs["name"]))
    return names


def keeping_dtype(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, keep: bool) -> torch.Tensor:
    """``fn(t)`` (a module's ``_apply`` function: ``.to(device)``, ``.half()``, ...) with ``t``'s
    dtype kept where ``keep`` or where ``t`` holds fp8 codes: ``fn`` sees ``t`` as integers of the
    same width, so it can move it but not convert it."""
    if (t.dtype in WIDE_FLOATS and not keep) or not t.is_floating_point():
        return fn(t)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return fn(t.view(as_int)).view(t.dtype)


def traced_float_dtype(graph: Graph) -> torch.dtype:
    """The float dtype the graph's float constants and inputs were traced in (the commonest)."""
    seen: Counter = Counter()
    values = [*graph.inputs, *(n.result for n in graph.nodes if n.op == "core.constant")]
    for v in values:
        t = v.type
        if isinstance(t, TensorType) and t.dtype.storage in WIDE_FLOATS:
            seen[t.dtype.storage] += 1
    return seen.most_common(1)[0][0] if seen else torch.float32


def activation_nodes(graph: Graph) -> set[int]:
    """``id`` of the nodes on the activation path: those reading a float graph input, an
    embedding lookup's result, or (transitively) a value computed from one."""
    active = {id(v) for v in graph.inputs
              if isinstance(v.type, TensorType) and v.type.dtype.storage in WIDE_FLOATS}
    nodes: set[int] = set()
    for node in graph.nodes:
        if "embedding" in node.op or any(v is not None and id(v) in active for v in node.operands):
            nodes.add(id(node))
            active.update(id(r) for r in node.results)
    return nodes


def casting(fn: Callable[..., object], dtype: torch.dtype | None) -> Callable[..., object]:
    """``fn`` with its float tensor operands brought to one dtype when they mix several:
    ``dtype`` (clamped to its range) when some of them are in it, else (``dtype`` None, or none
    in it) the widest of them, as torch's elementwise ops promote (a matmul does not)."""

    def run(*args, **kwargs):
        floats = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in WIDE_FLOATS}
        if len(floats) > 1:
            to = dtype if dtype in floats else functools.reduce(torch.promote_types, floats)
            args = tuple(_cast(a, to) if isinstance(a, torch.Tensor) and a.dtype in WIDE_FLOATS else a
                         for a in args)
        return fn(*args, **kwargs)

    return run


def _cast(t: torch.Tensor, to: torch.dtype) -> torch.Tensor:
    if t.dtype == to:
        return t
    info = torch.finfo(to)
    if torch.finfo(t.dtype).max > info.max:  # narrowing: fp32's −3.4e38 mask value → fp16's min, not −inf
        t = t.clamp(info.min, info.max)
    return t.to(to)


def retyped(kwargs: dict, traced: torch.dtype, dtype: torch.dtype) -> dict:
    """A registered op's attributes with the traced float dtype (a dequantize's ``out_dtype``)
    replaced by the run dtype."""
    run = DType.from_torch(dtype)
    return {k: run if isinstance(v, DType) and v.storage == traced else v for k, v in kwargs.items()}
