"""Lowering: fuse quantize/dequantize patterns into the quantized ops backends have kernels for.

- dequantize(W_q) → linear(x, ·, b)               ⇒  quant.linear(x, W_q, s, z, b)
- dynamic_quantize(x) → dequantize → quant.linear  ⇒  quant.dynamic_linear(x, W_q, s, z, b)

Both are exact (the fused ops' references compute the same thing); the ONNX and Triton
backends map the fused ops to integer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.ir.graph import Graph, Node
from lowbit.passes.base import Pass, PassContext, register
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
