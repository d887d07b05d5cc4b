"""The text form of a graph: one line per node, deterministic, tensors shown as shape + hash.

    graph @main(%x: f32[batch,4]) {
      %w = core.constant() {name="w"} : f32[8,4] #1f2e3d4c
      %linear = core.linear(%x, %w, none) : f32[batch,8]  @proj
      return %linear
    }

Opaque ops print their call, operands in place: ``aten.view.default(%x, [%n, -1])``.
``lowbit.ir.parser.parse_graph`` reads this text back.
"""

from __future__ import annotations

import json

from lowbit.ir.attrs import AttrValue, CallArgs, EnumAttr, Ref
from lowbit.ir.graph import Graph, Node, Value, constant_digest, tensor_digest
from lowbit.ir.opdef import is_opaque
from lowbit.ir.types import DType, TensorType, Type


def format_value(value: AttrValue, operands: list[Value | None] | None = None) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, DType):
        return value.short
    if isinstance(value, EnumAttr):
        return f"{value.kind}({json.dumps(value.value)})"
    if isinstance(value, Ref):
        operand = operands[value.index] if operands is not None else None
        return f"%{operand.name}" if operand is not None else "none"
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(v, operands) for v in value) + "]"
    raise TypeError(f"not an attribute value: {value!r}")


def format_type(t: Type) -> str:
    return str(t)


def _format_operands(node: Node) -> str:
    if is_opaque(node.op):
        call = node.attrs["args"]
        assert isinstance(call, CallArgs)
        parts = [format_value(a, node.operands) for a in call.args]
        parts += [f"{k}={format_value(v, node.operands)}" for k, v in call.kwargs]
        return ", ".join(parts)
    return ", ".join("none" if v is None else f"%{v.name}" for v in node.operands)


def format_node(node: Node, graph: Graph | None = None, digest=tensor_digest) -> str:
    results = ", ".join(f"%{r.name}" for r in node.results)
    line = f"{results} = {node.op}({_format_operands(node)})"
    attrs = {k: v for k, v in node.attrs.items() if not (is_opaque(node.op) and k == "args")}
    if attrs:
        body = ", ".join(f"{k}={format_value(attrs[k])}" for k in sorted(attrs))  # type: ignore[arg-type]
        line += " {" + body + "}"
    types = [format_type(r.type) for r in node.results]
    line += " : " + (types[0] if len(types) == 1 else "(" + ", ".join(types) + ")")
    if node.op == "core.constant" and graph is not None and digest is not None:
        name = str(node.attrs["name"])
        if name in graph.tensors:
            line += f" #{constant_digest(graph, name, digest)}"
    if node.loc.module:
        line += f"  @{node.loc.module}"
    return line


def print_graph(graph: Graph, digest=tensor_digest) -> str:
    """The graph's text; ``digest`` hashes constants (a caller printing many versions of one
    graph may pass a cached one; None leaves the hashes out)."""
    args = ", ".join(f"%{v.name}: {format_type(v.type)}" for v in graph.inputs)
    lines = [f"graph @{graph.name}({args}) {{"]
    lines += [f"  {format_node(n, graph, digest)}" for n in graph.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


def short_type(t: Type) -> str:
    """Compact type text for tables."""
    return str(t) if isinstance(t, TensorType) else format_type(t)
