"""Cleanup passes: identities, dead code, constant folding, common subexpressions.

All are lossless. In lowbit's functional IR a value is never mutated, so a copy (``clone``
without a memory format, dropout in eval mode, a cast to the dtype a value already has) is the
identity: its uses can read its input directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.ir.attrs import CallArgs
from lowbit.ir.graph import Graph, Node
from lowbit.ir.interpreter import node_callable
from lowbit.ir.opdef import is_opaque, lookup
from lowbit.ir.types import DType, TensorType
from lowbit.passes.base import Pass, PassContext, register

# ATen ops with side effects or randomness: never folded, deduplicated or removed as dead
_IMPURE = ("rand", "randn", "randint", "randperm", "bernoulli", "normal", "uniform",
           "dropout", "native_dropout", "multinomial", "empty", "empty_like", "new_empty")


def is_pure(node: Node) -> bool:
    if is_opaque(node.op):
        return node.op.split(".")[1] not in _IMPURE
    return lookup(node.op).pure


def remove_dead_nodes(graph: Graph) -> bool:
    """Erase pure nodes whose results nobody uses; returns whether any was erased."""
    outputs = {id(v) for v in graph.outputs}
    changed = False
    for node in graph.reversed_nodes():
        if is_pure(node) and not any(r.uses or id(r) in outputs for r in node.results):
            graph.erase(node)
            changed = True
    return changed


@register
@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    name: ClassVar[str] = "eliminate-dead-code"
    summary: ClassVar[str] = "erase nodes whose results are unused"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return remove_dead_nodes(graph)


def _identity_input(node: Node):
    """The operand a node merely passes through, or None if it computes something."""
    call = node.attrs.get("args")
    if not isinstance(call, CallArgs) or not node.operands or len(node.results) != 1:
        return None
    src = node.operands[0]
    if src is None or src.type != node.result.type:
        return None
    op = node.op
    kwargs = dict(call.kwargs)
    if op in ("aten.clone.default", "aten.alias.default", "aten.lift_fresh_copy.default"):
        return src if "memory_format" not in kwargs else None
    if op == "aten.dropout.default":
        return src if call.args[2:3] == (False,) else None
    if op in ("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten._to_copy.default",
              "aten.type_as.default"):
        return src  # same type in and out; a device move is the backend's business
    if op == "aten.slice.Tensor":  # from 0 by 1 to the same shape (an end of INT64_MAX, or the length itself)
        start, _, step = (list(call.args[2:5]) + [0, None, 1][len(call.args[2:5]):])[:3]
        return src if start in (0, None) and step == 1 else None
    if op in ("aten.mul.Tensor", "aten.div.Tensor", "aten.add.Tensor", "aten.sub.Tensor"):
        neutral = 1 if op in ("aten.mul.Tensor", "aten.div.Tensor") else 0
        other = call.args[1] if len(call.args) > 1 else None
        return src if not isinstance(other, bool) and other == neutral and not call.kwargs else None
    return None


def _cat_with_empty(node: Node, graph: Graph):
    """The other operand of a two-tensor ``cat`` whose one operand is an empty constant (how a
    transformers cache layer starts), or None."""
    if node.op != "aten.cat.default" or len(node.operands) != 2:
        return None
    for empty, other in (node.operands, node.operands[::-1]):
        if graph.is_constant(empty) and graph.tensor(empty).numel() == 0 and other is not None \
                and other.type == node.result.type:
            return other
    return None


@register
@dataclass(frozen=True)
class RemoveIdentities(Pass):
    name: ClassVar[str] = "remove-identities"
    summary: ClassVar[str] = "drop dropout (eval), plain clones, casts to the same dtype and joins with nothing"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in graph.nodes:
            src = _identity_input(node) or _cat_with_empty(node, graph)
            if src is not None:
                graph.replace_value(node.result, src)
                graph.erase(node)
                changed = True
        return changed


@register
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate pure nodes whose operands are all constants and store the result as a new
    constant. A result larger than ``max_elements`` is folded only if its constant operands
    have no other users, or if it is one of the slices ``select`` takes of a constant that
    nothing else reads (a stack of expert weights read one expert at a time: the slices
    replace it), so folding never grows the model."""

    name: ClassVar[str] = "fold-constants"
    summary: ClassVar[str] = "evaluate nodes whose inputs are all constants"
    max_elements: int = 65536

    def _foldable(self, node: Node, graph: Graph) -> bool:
        if node.op == "core.constant" or not is_pure(node) or len(node.results) != 1:
            return False
        t = node.result.type
        if not isinstance(t, TensorType) or not t.is_static or t.dtype in (DType.i4, DType.u4):
            return False
        if not all(graph.is_constant(v) for v in node.operands if v is not None):
            return False
        if is_opaque(node.op) and not node.operands and node.op.split(".")[1] not in (
                "arange", "zeros", "ones", "full", "scalar_tensor", "tensor"):
            return False
        if t.numel() > self.max_elements:
            return bool(node.operands) and (all(len(v.users) == 1 for v in node.operands if v is not None)
                                            or _distinct_selects(node))
        return True

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in graph.nodes:
            if not self._foldable(node, graph):
                continue
            fn, kwargs = node_callable(node)
            args = [None if v is None else graph.tensor(v) for v in node.operands]
            with torch.no_grad():
                value = fn(*args, **kwargs)
            if not isinstance(value, torch.Tensor):
                continue
            new = graph.constant(value.contiguous(), _folded_name(node, graph), node.loc.copy(), before=node)
            new.producer.touch(self.name)
            graph.replace_value(node.result, new)
            graph.erase(node)
            changed = True
        if changed:
            remove_dead_nodes(graph)
        return changed


_RESHAPES = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.unsqueeze.default",
             "aten.squeeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.flatten.using_ints")


# elementwise ops whose input an export can recover from the folded constant (Mamba's A = -exp(A_log))
_INVERTIBLE = {"aten.exp.default": "exp", "aten.neg.default": "neg", "core.neg": "neg", "aten._to_copy.default": "to"}


def _distinct_selects(node: Node) -> bool:
    """Whether ``node`` selects from a tensor that only selects along one dim read, each at
    its own index: the selects partition it."""
    if node.op != "aten.select.int":
        return False
    picks = []
    for user in node.operand(0).users:
        args = user.attrs["args"].args if user.op == "aten.select.int" else ()
        if len(args) != 3 or user.operands[0] is not node.operands[0] or not all(isinstance(a, int) for a in args[1:]):
            return False
        picks.append(tuple(args[1:]))
    return len({dim for dim, _ in picks}) == 1 and len(set(picks)) == len(picks)


def _folded_name(node: Node, graph: Graph) -> str:
    """The name of a folded node's constant: ``W.mT`` for a named weight ``W`` with its last two
    dims swapped (MoE experts stored [experts, out, in] and read [experts, in, out]), ``W.view``
    for ``W`` only reshaped (gpt-oss's attention sinks, [heads] read as [1, heads, 1, 1]),
    ``W.3`` for ``W[3]`` where selects partition ``W`` (JetMoE's experts), ``W.exp``, ``W.neg``
    and ``W.to`` for ``W`` through an invertible elementwise op (Mamba's ``-exp(A_log)``, named
    ``A_log.exp.neg``), so that exports can still say which parameter it is and recover it;
    the node's own name otherwise."""
    if _distinct_selects(node) and graph.is_constant(node.operand(0)):
        dim, index = node.attrs["args"].args[1:]
        return f"{node.operand(0).producer.attrs['name']}.{index}" if dim == 0 else node.result.name
    if node.op in _RESHAPES and graph.is_constant(node.operands[0] if node.operands else None):
        return f"{node.operand(0).producer.attrs['name']}.view"
    if node.op in _INVERTIBLE and len(node.operands) == 1 and graph.is_constant(node.operand(0)):
        return f"{node.operand(0).producer.attrs['name']}.{_INVERTIBLE[node.op]}"
    if node.op == "aten.transpose.int" and node.operands and graph.is_constant(node.operand(0)):
        rank = node.operand(0).tensor_type.rank
        dims = sorted(int(d) % rank for d in node.attrs["args"].args[1:3]) if rank >= 2 else []
        if dims == [rank - 2, rank - 1]:
            return f"{node.operand(0).producer.attrs['name']}.mT"
    return node.result.name


def _cse_key(node: Node) -> tuple | None:
    if node.op == "core.constant" or not is_pure(node):
        return None
    operands = tuple(id(v) if v is not None else None for v in node.operands)
    attrs = tuple(sorted((k, repr(v)) for k, v in node.attrs.items()))
    return node.op, operands, attrs, tuple(str(r.type) for r in node.results)


@register
@dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    name: ClassVar[str] = "eliminate-common-subexpressions"
    summary: ClassVar[str] = "merge nodes that compute the same thing from the same operands"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        seen: dict[tuple, Node] = {}
        changed = False
        for node in graph.nodes:
            key = _cse_key(node)
            if key is None:
                continue
            first = seen.setdefault(key, node)
            if first is node:
                continue
            for old, new in zip(node.results, first.results):
                graph.replace_value(old, new)
            graph.erase(node)
            changed = True
        return changed
