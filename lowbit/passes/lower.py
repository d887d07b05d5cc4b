"""Lowering: fuse quantize/dequantize patterns into the quantized ops backends have kernels for.

- dequantize(W_q) → linear(x, ·, b)               ⇒  quant.linear(x, W_q, s, z, b)
- dynamic_quantize(x) → dequantize → quant.linear  ⇒  quant.dynamic_linear(x, W_q, s, z, b)

Kernel backends (Triton) then fuse what their kernels take whole:

- quantize(x, s_x, z_x) → dequantize (per tensor) → quant.linear  ⇒  quant.static_linear
- rotate.hadamard(x) → quant.dynamic_linear  ⇒  quant.dynamic_linear{hadamard=true}(x)
  (only when every user of the rotation is such a linear, so the rotation disappears: each
  linear then rotates and quantizes its input in one kernel, reading x once)

All are exact (the fused ops' references compute the same thing); the ONNX and Triton
backends map the fused ops to integer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.ir.graph import Graph, Node
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.cleanup import remove_dead_nodes
from lowbit.passes.rewriter import Bindings, Rule, apply_rules, replace_with, single_user


def _match_qlinear(node: Node, graph: Graph) -> Bindings | str:
    w = node.operands[1]
    dq = w.producer if w is not None else None
    if dq is None or dq.op != "quant.dequantize":
        return "the weight is not dequantized"
    if not all(v is None or graph.is_constant(v) for v in dq.operands):
        return "the quantized weight or its scale is not a constant"
    if single_user(w, graph) is not node:
        return "the dequantized weight has other users"
    return {"linear": node, "dq": dq}


def _rewrite_qlinear(b: Bindings, graph: Graph) -> None:
    node, dq = b["linear"], b["dq"]
    assert isinstance(node, Node) and isinstance(dq, Node)
    attrs = {k: dq.attrs[k] for k in ("axis", "group_size") if k in dq.attrs}
    replace_with(graph, node, "quant.linear", [node.operands[0], *dq.operands, node.operands[2]], attrs,
                 "fuse-quantized-linear")
    graph.erase(node)


def _match_dynamic(node: Node, graph: Graph) -> Bindings | str:
    x = node.operand(0)
    dq = x.producer
    if dq is None or dq.op != "quant.dequantize" or dq.attrs.get("axis") is not None:
        return "the input is not a per-token dequantize"
    dyn = dq.operand(0).producer
    if dyn is None or dyn.op != "quant.dynamic_quantize" or dq.operands[1] is not dyn.results[1]:
        return "the input is not quantized per token at run time"
    return {"linear": node, "source": dyn}


def _rewrite_dynamic(b: Bindings, graph: Graph) -> None:
    node, dyn = b["linear"], b["source"]
    assert isinstance(node, Node) and isinstance(dyn, Node)
    attrs = {"act_dtype": dyn.attrs["dtype"], "symmetric": dyn.attrs.get("symmetric", True), **node.attrs}
    if dyn.attrs.get("clip", 1.0) != 1.0:
        attrs["clip"] = dyn.attrs["clip"]
    replace_with(graph, node, "quant.dynamic_linear", [dyn.operand(0), *node.operands[1:]], attrs,
                 "fuse-quantized-linear")
    graph.erase(node)


QLINEAR = Rule("fuse-quantized-linear", ("core.linear",), _match_qlinear, _rewrite_qlinear)
DYNAMIC_QLINEAR = Rule("fuse-dynamic-linear", ("quant.linear",), _match_dynamic, _rewrite_dynamic)


@register
@dataclass(frozen=True)
class FuseQuantizedLinear(Pass):
    name: ClassVar[str] = "fuse-quantized-linear"
    summary: ClassVar[str] = "dequantize → linear (and per-token QDQ before it) → quant.linear / quant.dynamic_linear"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_rules(graph, [QLINEAR, DYNAMIC_QLINEAR], self.name)


def _match_static(node: Node, graph: Graph) -> Bindings | str:
    dq = node.operand(0).producer
    if dq is None or dq.op != "quant.dequantize" or dq.attrs.get("axis") is not None:
        return "the input is not a per-tensor dequantize"
    q = dq.operand(0).producer
    if q is None or q.op != "quant.quantize" or q.attrs.get("axis") is not None:
        return "the dequantized input is not quantized per tensor"
    if not all(v is None or graph.is_constant(v) for v in q.operands[1:]):
        return "the activation scale or zero point is not a constant"
    if dq.operands[1:] != q.operands[1:]:
        return "quantize and dequantize use different scales"
    return {"linear": node, "quantize": q}


def _rewrite_static(b: Bindings, graph: Graph) -> None:
    node, q = b["linear"], b["quantize"]
    assert isinstance(node, Node) and isinstance(q, Node)
    operands = [q.operand(0), q.operands[1], q.operands[2] if len(q.operands) > 2 else None,
                *node.operands[1:]]
    replace_with(graph, node, "quant.static_linear", operands, {"act_dtype": q.attrs["dtype"], **node.attrs},
                 "fuse-static-linear")
    graph.erase(node)


def _match_hadamard(node: Node, graph: Graph) -> Bindings | str:
    rot = node.operand(0).producer
    if rot is None or rot.op != "rotate.hadamard":
        return "the input is not rotated by rotate.hadamard"
    if any(o is rot.result for o in graph.outputs) or \
            any(u.op != "quant.dynamic_linear" for u in rot.result.users):
        return "the rotation has users other than dynamic linears (it would be computed twice)"
    return {"linear": node, "rotation": rot}


def _rewrite_hadamard(b: Bindings, graph: Graph) -> None:
    node, rot = b["linear"], b["rotation"]
    assert isinstance(node, Node) and isinstance(rot, Node)
    replace_with(graph, node, "quant.dynamic_linear", [rot.operand(0), *node.operands[1:]],
                 {**node.attrs, "hadamard": True}, "fuse-hadamard-quantize")
    graph.erase(node)
    if not rot.result.users:
        graph.erase(rot)


STATIC_QLINEAR = Rule("fuse-static-linear", ("quant.linear",), _match_static, _rewrite_static)
HADAMARD_QLINEAR = Rule("fuse-hadamard-quantize", ("quant.dynamic_linear",), _match_hadamard, _rewrite_hadamard)


@register
@dataclass(frozen=True)
class FuseStaticLinear(Pass):
    name: ClassVar[str] = "fuse-static-linear"
    summary: ClassVar[str] = "per-tensor quantize → dequantize → quant.linear → quant.static_linear (kernel backends)"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = apply_rules(graph, [STATIC_QLINEAR], self.name)
        if changed:
            remove_dead_nodes(graph)  # the QDQ pairs every user of which was fused
        return changed


@register
@dataclass(frozen=True)
class FuseHadamardQuantize(Pass):
    name: ClassVar[str] = "fuse-hadamard-quantize"
    summary: ClassVar[str] = "rotate.hadamard → quant.dynamic_linear → one rotate-and-quantize (kernel backends)"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_rules(graph, [HADAMARD_QLINEAR], self.name)
