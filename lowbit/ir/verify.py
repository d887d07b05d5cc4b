"""``verify(graph)``: def-before-use, use lists, op declarations, attribute kinds, types and each
op's own rules. Raises ``VerifyError`` naming the node and its module path."""

from __future__ import annotations

from lowbit.errors import VerifyError
from lowbit.ir.attrs import CallArgs, attr_matches
from lowbit.ir.dialects.infer import dims_equal
from lowbit.ir.graph import Graph, Node, tensor_type_of
from lowbit.ir.opdef import OpDef, is_opaque, lookup, resolve_target
from lowbit.ir.printer import format_node
from lowbit.ir.types import TensorType, Type


def _where(node: Node) -> str:
    return format_node(node)  # the printed line ends with the node's module path


def verify(graph: Graph) -> None:
    defined: set[int] = {id(v) for v in graph.inputs}
    for v in graph.inputs:
        for use in v.uses:
            if use.node.graph is not graph or use.node.operands[use.index] is not v:
                raise VerifyError(f"graph input %{v.name} has a stale use in {use.node}")
    for node in graph.nodes:
        try:
            _verify_node(graph, node, defined)
        except VerifyError as e:
            raise VerifyError(f"{e}\n  in: {_where(node)}") from None
        defined.update(id(r) for r in node.results)
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerifyError(f"graph output %{v.name} is not defined")


def _verify_node(graph: Graph, node: Node, defined: set[int]) -> None:
    if node.graph is not graph:
        raise VerifyError("node does not belong to this graph")
    for i, v in enumerate(node.operands):
        if v is None:
            continue
        if id(v) not in defined:
            raise VerifyError(f"operand {i} %{v.name} is used before it is defined")
        if not any(u.node is node and u.index == i for u in v.uses):
            raise VerifyError(f"operand {i} %{v.name} is missing from its use list")
    for r in node.results:
        for use in r.uses:
            if use.node.graph is not graph or use.node.operands[use.index] is not r:
                raise VerifyError(f"%{r.name} has a stale use in {use.node}")
    opdef = lookup(node.op)
    if is_opaque(node.op):
        _verify_opaque(node)
    else:
        _verify_declared(graph, node, opdef)
    if opdef.verify is not None:
        opdef.verify(node)


def _verify_opaque(node: Node) -> None:
    call = node.attrs.get("args")
    if not isinstance(call, CallArgs) or set(node.attrs) != {"args"}:
        raise VerifyError(f"opaque op {node.op} must carry exactly one 'args' call attribute")
    if sorted(r.index for r in call.refs()) != list(range(len(node.operands))):
        raise VerifyError("the call's operand references do not match the operands")
    resolve_target(node.op)


def _verify_declared(graph: Graph, node: Node, opdef: OpDef) -> None:
    if len(node.operands) != len(opdef.operands):
        raise VerifyError(f"{node.op} takes {len(opdef.operands)} operands "
                          f"({', '.join(o.name for o in opdef.operands)}), got {len(node.operands)}")
    for spec, v in zip(opdef.operands, node.operands):
        if v is None and not spec.optional:
            raise VerifyError(f"operand {spec.name!r} is required")
    names = {a.name for a in opdef.attrs}
    for key, value in node.attrs.items():
        if key not in names:
            raise VerifyError(f"unknown attribute {key!r}; {node.op} has {sorted(names) or 'none'}")
        kind = opdef.attr(key).kind
        if not attr_matches(kind, value):
            raise VerifyError(f"attribute {key}={value!r} must be {kind.value}")
    for a in opdef.attrs:
        if a.required and a.name not in node.attrs:
            raise VerifyError(f"attribute {a.name!r} is required")
    if node.op == "core.constant":
        _verify_constant(graph, node)
    elif opdef.infer is not None:
        types = [v.type if v is not None else None for v in node.operands]
        expected = opdef.infer(types, opdef.full_attrs(node.attrs))
        _compare_types(expected, [r.type for r in node.results])


def _verify_constant(graph: Graph, node: Node) -> None:
    name = str(node.attrs["name"])
    if name not in graph.tensors:
        raise VerifyError(f"constant {name!r} has no tensor in the graph")
    shape, dtype = graph.tensors.meta(name)
    declared = node.result.tensor_type
    if shape != declared.shape or dtype != declared.dtype.storage:
        raise VerifyError(f"constant {name!r} is declared {declared}, but its tensor is "
                          f"{tensor_type_of(graph.tensors.raw(name))}")
    if declared.dtype.bits < 8 and not graph.tensors.is_lazy(name) and graph.tensors[name].numel():
        tensor = graph.tensors[name]
        lo, hi = declared.dtype.int_range
        if tensor.min().item() < lo or tensor.max().item() > hi:
            raise VerifyError(f"constant {name!r} holds values outside the {declared.dtype.short} range")


def _compare_types(expected: list[Type], actual: list[Type]) -> None:
    if len(expected) != len(actual):
        raise VerifyError(f"expected {len(expected)} results, got {len(actual)}")
    for e, a in zip(expected, actual):
        ok = (isinstance(e, TensorType) and isinstance(a, TensorType) and e.dtype == a.dtype
              and e.rank == a.rank and all(dims_equal(x, y) for x, y in zip(e.shape, a.shape)))
        if not ok and e != a:
            raise VerifyError(f"result type {a} does not match the inferred {e}")
