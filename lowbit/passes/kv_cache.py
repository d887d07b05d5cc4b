"""``quantize-kv-cache``: a decode step's key/value cache stored quantized.

A causal LM traced with its cache (``lowbit.frontend.decoder``) has, per layer and kind, a
cache input ``past`` and a ``cat(past, new)`` along the sequence that is both what attention
reads and the cache output ``present``. The pass quantizes ``new`` once, when its tokens enter
the cache, and the cache holds the codes from then on:

- ``<dtype>/token`` (int8, fp8, int4; ``asym`` for a zero point): one scale per token and head,
  computed at run time; the cache holds codes plus a float16 scale (and zero point) per token.
  int4 codes are packed two per byte.
- ``<int dtype>/channel``: one calibrated scale (and zero point) per head and channel, KIVI's
  choice for keys, whose outliers sit in fixed channels; the cache holds only the codes.

Attention reads the dequantized cache, the new tokens included, so a prompt sees the same
numbers its continuation will. ``storage=float`` keeps the cache in float holding the same
dequantized values (the form ONNX Runtime GenAI's float cache can carry): the same function,
without the memory saving. Each cache input becomes several (codes, scales, zero points), each
paired with the output at the same position, so generation feeds them back unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.frontend.decoder import STATE_NAME
from lowbit.ir.attrs import CallArgs, Ref
from lowbit.ir.graph import Graph, Location, Node, Value
from lowbit.ir.types import DType, TensorType
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.cleanup import remove_dead_nodes
from lowbit.quant.calibrate import calibrate
from lowbit.quant.observers import EPS
from lowbit.quant.spec import QSpec, parse_qspec

_PAST = re.compile(r"past_\d+_(key|value)$")


@dataclass
class CacheSlot:
    past: Value   # the cache input
    join: Node    # cat(past, new) along the sequence: what attention reads
    kind: str     # "key" | "value"
    trims: tuple[Node, ...] = ()  # slices of past along the sequence before the join (a sliding window)
    stored: Node | None = None    # the slice of the join that is the cache output (None: the join itself)

    @property
    def new(self) -> Value:
        return self.join.operands[1]

    @property
    def present(self) -> Value:
        return self.join.result if self.stored is None else self.stored.result


def _sequence_slice(node: Node) -> bool:
    """``x[:, :, a:b]`` with literal bounds: keeps the same tokens of codes, scales and zeros."""
    if node.op != "aten.slice.Tensor":
        return False
    args = node.attrs["args"].args
    return len(node.operands) == 1 and len(args) >= 2 and args[1] in (2, -2) \
        and all(isinstance(a, int) for a in args[1:])


def _only_user(value: Value, keep) -> Node | None:
    users = [u for u in value.users if not keep(u)]
    return users[0] if len(users) == 1 else None


def cache_slots(graph: Graph) -> list[CacheSlot]:
    """The float cache inputs of a decode step, the join that extends each, and the slices a
    sliding-window layer applies on the way (its cache keeps the last tokens only)."""
    outputs = {id(v) for v in graph.outputs}
    slots = []
    for value in graph.inputs:
        match = _PAST.match(value.name)
        if not match:
            continue
        trims, x = [], value
        join = _only_user(x, _size_of_leading_dim)
        while join is not None and _sequence_slice(join):
            trims.append(join)
            x = join.result
            join = _only_user(x, lambda u: False)
        if join is None or join.op != "aten.cat.default" or len(join.operands) != 2 or join.operands[0] is not x \
                or join.attrs["args"].args[1] not in (-2, 2):
            continue
        stored = None
        if id(join.result) not in outputs:
            stored = next((u for u in join.result.users if _sequence_slice(u) and id(u.result) in outputs), None)
            if stored is None:
                continue
        slots.append(CacheSlot(value, join, match.group(1), tuple(trims), stored))
    return slots


def _size_of_leading_dim(node: Node) -> bool:
    """``sym_size(past, d)`` for a dim the codes share with the float cache (all but the last)."""
    return node.op == "aten.sym_size.int" and node.attrs["args"].args[1] in (0, 1, 2, -2, -3, -4)


class ChannelRange:
    """Min and max per head and channel of [batch, heads, tokens, dim] values."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = x.float().amin((0, 2), keepdim=True), x.float().amax((0, 2), keepdim=True)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


def _replace_io(values: list[Value], old: Value, new: list[Value]) -> list[Value]:
    i = next(k for k, v in enumerate(values) if v is old)
    return values[:i] + new + values[i + 1:]


@register
@dataclass(frozen=True)
class QuantizeKvCache(Pass):
    name: ClassVar[str] = "quantize-kv-cache"
    lossless: ClassVar[bool] = False
    idempotent: ClassVar[bool] = False
    summary: ClassVar[str] = "store a decode step's key/value cache quantized (int8/fp8 per token, int4 KIVI)"
    keys: str = "int8/token"
    values: str = "int8/token"
    storage: str = "quantized"  # quantized | float (the same values, held as floats)

    def __post_init__(self) -> None:
        for kind in ("keys", "values"):
            spec = parse_qspec(getattr(self, kind), f"{self.name}.{kind}")
            if spec.granularity not in ("token", "channel"):
                raise ValueError(f"{self.name}.{kind}: {getattr(self, kind)!r}: the cache is quantized per "
                                 "token (scales at run time) or per channel (calibrated)")
            if spec.granularity == "channel" and spec.dtype.is_float:
                raise ValueError(f"{self.name}.{kind}: fp8 is quantized per token")
        if self.storage not in ("quantized", "float"):
            raise ValueError(f"{self.name}.storage: {self.storage!r} is not one of quantized, float")

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        slots = cache_slots(graph)
        states = [v.name for v in graph.inputs if STATE_NAME.match(v.name)]
        if states:
            ctx.note(f"{self.name}: the recurrent layers' {len(states)} fixed-size states ({', '.join(states[:3])}"
                     f"{', ...' if len(states) > 3 else ''}) stay float: they are replaced, not extended, by "
                     "each step, so a rounding error would compound over the sequence")
        if not slots:
            ctx.note(f"{self.name}: the graph has no key/value cache (a causal LM traced with its cache has"
                     + ("; this one's layers are all recurrent" if states else "") + "): nothing quantized")
            return False
        specs = {"key": parse_qspec(self.keys, f"{self.name}.keys"),
                 "value": parse_qspec(self.values, f"{self.name}.values")}
        static = [s.new for s in slots if specs[s.kind].granularity == "channel"]
        ranges = calibrate(graph, ctx.require_calibration(self.name), static, progress=ctx.progress,
                           desc=self.name, observer=ChannelRange) if static else {}
        for slot in slots:
            spec = specs[slot.kind]
            codes = self._quantize_new(graph, slot, spec, ranges.get(slot.new.name))
            if self.storage == "float":
                slot.join.set_operand(1, self._dequantize(graph, slot, spec, codes))
            else:
                self._store_quantized(graph, slot, spec, codes)
            slot.join.touch(self.name)
        remove_dead_nodes(graph)
        return True

    # ---- the new tokens' codes -----------------------------------------------------------
    def _quantize_new(self, graph: Graph, slot: CacheSlot, spec: QSpec, rng: ChannelRange | None) -> list[Value]:
        """[codes, scale, zero point?] of the new tokens: per token (scale [..., 1], computed
        here) or per channel (constants [1, heads, 1, dim])."""
        loc, first = Location(slot.join.loc.module), slot.join
        if spec.granularity == "token":
            q = graph.append("quant.dynamic_quantize", [slot.new], {"dtype": spec.dtype, "symmetric": spec.symmetric},
                             loc=loc, before=first, name=f"{slot.past.name}_new")
            q.touch(self.name)
            half = graph.append("aten._to_copy.default", [q.results[1]],
                                {"args": CallArgs((Ref(0),), (("dtype", DType.f16),))},
                                [TensorType(q.results[1].tensor_type.shape, DType.f16)], loc=loc, before=first,
                                name=f"{slot.past.name}_new_scale")  # 2 bytes a token: the scale's 1e-3 is enough
            return [q.results[0], half.result] + ([] if spec.symmetric else [q.results[2]])
        qmin, qmax = spec.dtype.int_range
        if spec.symmetric:
            scale = (torch.maximum(rng.hi.abs(), rng.lo.abs()) / qmax).clamp_min(EPS)
            zero = None
        else:
            lo, hi = rng.lo.clamp(max=0), rng.hi.clamp(min=0)
            scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
            zero = torch.round(qmin - lo / scale).clamp(qmin, qmax).to(spec.dtype.storage)
        sv = graph.constant(scale, f"{slot.past.name}.scale", loc)
        zv = None if zero is None else graph.constant(zero, f"{slot.past.name}.zero_point", loc, dtype=spec.dtype)
        q = graph.append("quant.quantize", [slot.new, sv, zv], {"dtype": spec.dtype}, loc=loc, before=first,
                         name=f"{slot.past.name}_new")
        q.touch(self.name)
        return [q.result, sv] + ([] if zv is None else [zv])

    def _dequantize(self, graph: Graph, slot: CacheSlot, spec: QSpec, parts: list[Value],
                    before: Node | None = None) -> Value:
        codes, scale, zero = parts[0], parts[1], (parts[2] if len(parts) > 2 else None)
        dq = graph.append("quant.dequantize", [codes, scale, zero], {"out_dtype": slot.new.tensor_type.dtype},
                          loc=Location(slot.join.loc.module), before=before or slot.join)
        dq.touch(self.name)
        return dq.result

    # ---- the cache holds codes ---------------------------------------------------------
    def _store_quantized(self, graph: Graph, slot: CacheSlot, spec: QSpec, parts: list[Value]) -> None:
        """New cache inputs/outputs for the codes (packed for 4 bits) and the per-token scales
        (and zero points); attention reads their dequantized join."""
        loc, join = Location(slot.join.loc.module), slot.join
        four_bit = spec.dtype.bits == 4
        codes = parts[0]
        if four_bit:
            pack = graph.append("quant.pack_int4", [codes], loc=loc, before=join)
            codes = pack.result
        per_token = spec.granularity == "token"
        stored = [codes] + (parts[1:] if per_token else [])
        suffixes = ["", "_scale", "_zero"][:len(stored)]
        past_shape = slot.past.tensor_type.shape
        ins, outs = [], []
        joined = []
        for value, suffix in zip(stored, suffixes):
            shape = past_shape[:-1] + (value.tensor_type.shape[-1],)
            dtype = value.tensor_type.dtype
            if suffix:
                past = graph.add_input(f"{slot.past.name}{suffix}", TensorType(shape, dtype))
                graph.inputs.pop()  # placed below, where the float cache input was
            else:  # the codes take the float input's name (past_N_key): generation pairs by position
                past = Value(slot.past.name, TensorType(shape, dtype))
            kept = past
            for trim in slot.trims:  # a sliding window's slices, on codes and scales alike
                kept = self._like(graph, trim, kept, loc, join)
            cat = graph.append("aten.cat.default", [kept, value], {"args": _cat_args()},
                               [TensorType(slot.join.result.tensor_type.shape[:-1] + (value.tensor_type.shape[-1],),
                                           dtype)], loc=loc, before=join, name=f"present_{slot.past.name}{suffix}")
            cat.touch(self.name)
            ins.append(past)
            joined.append(cat.result)
            outs.append(cat.result if slot.stored is None else self._like(graph, slot.stored, cat.result, loc, join))
        full = joined[0]
        if four_bit:
            unpack = graph.append("quant.unpack_int4", [full], {"dtype": spec.dtype}, loc=loc, before=join)
            full = unpack.result
        deq_parts = [full] + (joined[1:] if per_token else parts[1:])
        present = slot.present
        graph.set_outputs(_replace_io(graph.outputs, present, outs))
        if slot.stored is not None:
            graph.erase(slot.stored)
        slot.join.result.replace_all_uses_with(self._dequantize(graph, slot, spec, deq_parts, before=join))
        for user in [u for u in slot.past.users if _size_of_leading_dim(u)]:
            user.set_operand(0, ins[0])  # the cache's length, read from its codes
        graph.inputs = _replace_io(graph.inputs, slot.past, ins)

    def _like(self, graph: Graph, slice_node: Node, value: Value, loc: Location, before: Node) -> Value:
        """``slice_node``'s slice (literal bounds along the sequence) applied to ``value``."""
        shape = slice_node.result.tensor_type.shape[:-1] + (value.tensor_type.shape[-1],)
        node = graph.append("aten.slice.Tensor", [value], dict(slice_node.attrs),
                            [TensorType(shape, value.tensor_type.dtype)], loc=loc, before=before)
        node.touch(self.name)
        return node.result


def _cat_args():
    return CallArgs(((Ref(0), Ref(1)), -2), ())


# kv_cache= presets of lowbit.compile / --kv-cache: (extra passes before, keys, values)
KV_PRESETS = {
    "int8": ("", "int8/token", "int8/token"),
    "fp8": ("", "fp8/token", "fp8/token"),
    "k8v4": ("", "int8/token", "int4/token/asym"),
    "int4": ("", "int4/channel/asym", "int4/token/asym"),  # KIVI: keys per channel, values per token
    "int4-rot": ("online-hadamard{where=none,qk=true}", "int4/token/asym", "int4/token/asym"),  # QuaRot: rotated keys
}


def kv_pipeline(preset: str, storage: str = "quantized") -> str:
    """The passes for a ``kv_cache`` preset (see ``KV_PRESETS``)."""
    if preset not in KV_PRESETS:
        raise ValueError(f"unknown kv_cache {preset!r}: choose one of {', '.join(KV_PRESETS)}")
    before, keys, values = KV_PRESETS[preset]
    step = f"quantize-kv-cache{{keys={keys},values={values},storage={storage}}}"
    return f"{before},{step}" if before else step
