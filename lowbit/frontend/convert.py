"""ExportedProgram → lowbit Graph.

Parameters, buffers and lifted constants become ``core.constant`` nodes named by their
state-dict key; user inputs become graph inputs; ATen calls become ``core`` ops where
``lowbit.frontend.aten`` has a rule, otherwise opaque ``aten.*`` nodes. Symbolic sizes print
with the names given in ``dynamic_shapes``. Each node keeps the module path it came from.
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from lowbit.errors import TraceError
from lowbit.frontend import aten
from lowbit.ir.attrs import AttrValue, CallArgs, EnumAttr, Ref
from lowbit.ir.graph import Graph, Location, Value
from lowbit.ir.types import DType, NoneType, ScalarKind, ScalarType, TensorType, Type

_DROPPED = {
    "aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default", "aten.sym_constrain_range.default",
    "aten._assert_async.msg",
}


class _Converter:
    def __init__(self, ep: ExportedProgram, axis_names: list[dict[int, str]]):
        self.ep = ep
        self.graph = Graph()
        self.env: dict[torch.fx.Node, Value | list[Value]] = {}
        self.symbols: dict[sympy.Symbol, sympy.Symbol] = {}
        self.axis_names = axis_names

    # ---- types -------------------------------------------------------------------------
    def dim(self, d: object) -> int | str:
        if isinstance(d, int):
            return d
        expr = d.node.expr  # type: ignore[attr-defined]
        if expr.is_number:
            return int(expr)
        return str(expr.xreplace(self.symbols)).replace(" ", "")

    def type_of(self, val: object) -> Type:
        if isinstance(val, torch.Tensor):
            return TensorType(tuple(self.dim(d) for d in val.shape), DType.from_torch(val.dtype))
        if isinstance(val, (torch.SymBool, bool)):
            return ScalarType(ScalarKind.bool)
        if isinstance(val, (torch.SymInt, int)):
            return ScalarType(ScalarKind.int)
        if isinstance(val, (torch.SymFloat, float)):
            return ScalarType(ScalarKind.float)
        if val is None:
            return NoneType()
        raise TraceError(f"unsupported value of type {type(val).__name__} in the traced graph")

    def name_symbols(self, user_inputs: list[torch.fx.Node]) -> None:
        """Map torch's size symbols (s0, s72, ...) to the names given in dynamic_shapes."""
        for node, names in zip(user_inputs, self.axis_names):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for axis, name in names.items():
                d = val.shape[axis]
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    self.symbols.setdefault(d.node.expr, sympy.Symbol(name))

    # ---- nodes -------------------------------------------------------------------------
    def loc(self, node: torch.fx.Node) -> Location:
        return Location(module_path(node))

    def value(self, arg: torch.fx.Node) -> Value:
        v = self.env[arg]
        if isinstance(v, list):
            raise TraceError(f"{arg.name} has several results; a getitem must pick one")
        return v

    def template(self, arg: object, refs: list[Value]) -> AttrValue:
        if isinstance(arg, torch.fx.Node):
            refs.append(self.value(arg))
            return Ref(len(refs) - 1)
        if isinstance(arg, (list, tuple)):
            return tuple(self.template(a, refs) for a in arg)
        if arg is None or isinstance(arg, (bool, int, float, str)):
            return arg
        if isinstance(arg, torch.dtype):
            return DType.from_torch(arg)
        if isinstance(arg, torch.device):
            return EnumAttr("device", str(arg))
        if isinstance(arg, torch.layout):
            return EnumAttr("layout", str(arg).removeprefix("torch."))
        if isinstance(arg, torch.memory_format):
            return EnumAttr("memory_format", str(arg).removeprefix("torch."))
        raise TraceError(f"unsupported argument {arg!r} ({type(arg).__name__})")

    def call(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            src = self.env[node.args[0]]
            if not isinstance(src, list):
                raise TraceError(f"getitem on single-result node {node.args[0].name}")
            self.env[node] = src[node.args[1]]
            return
        name = _op_name(target)
        if name in _DROPPED:
            return
        val = node.meta.get("val")
        multi = isinstance(val, (list, tuple))
        types = [self.type_of(v) for v in val] if multi else [self.type_of(val)]
        loc = self.loc(node)
        converted = None
        if isinstance(target, torch._ops.OpOverload) and not multi:
            converted = aten.convert(name, target, node.args, node.kwargs, self.is_tensor)
        elif name == "aten._native_batch_norm_legit_no_training.default":
            converted = aten.convert(name, target, node.args, node.kwargs, self.is_tensor)
        if converted is not None:
            op, operands, attrs = converted
            ir_node = self.graph.append(op, [None if o is None else self.value(o) for o in operands],
                                        attrs, types[:1], loc, name=node.name)
            self.env[node] = ir_node.result if not multi else [ir_node.result] + [None] * (len(types) - 1)  # type: ignore[list-item]
            return
        refs: list[Value] = []
        args = tuple(self.template(a, refs) for a in node.args)
        kwargs = tuple((k, self.template(v, refs)) for k, v in node.kwargs.items())
        ir_node = self.graph.append(name, refs, {"args": CallArgs(args, kwargs)}, types, loc,
                                    name=node.name)
        self.env[node] = list(ir_node.results) if multi else ir_node.result

    def is_tensor(self, arg: object) -> bool:
        return isinstance(arg, torch.fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)

    # ---- program -----------------------------------------------------------------------
    def run(self) -> Graph:
        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs}
        placeholders = [n for n in self.ep.graph.nodes if n.op == "placeholder"]
        user = [n for n in placeholders if specs[n.name].kind == InputKind.USER_INPUT]
        self.name_symbols(user)
        for node in placeholders:
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                self.env[node] = self.graph.add_input(node.name, self.type_of(node.meta.get("val")))
            else:
                self.env[node] = self.constant(node, spec)
        for node in self.ep.graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                self.outputs(node)
            elif node.op != "placeholder":
                raise TraceError(f"unsupported FX node {node.op} {node.name}")
        return self.graph

    def constant(self, node: torch.fx.Node, spec) -> Value:
        key = spec.target
        if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and key in self.ep.state_dict):
            tensor = self.ep.state_dict[key]
        else:
            tensor = self.ep.constants[key]
        if not isinstance(tensor, torch.Tensor):
            raise TraceError(f"constant {key} is a {type(tensor).__name__}, not a tensor")
        if tensor.is_complex():  # lowbit.frontend.complex reads it as its real view
            tensor = torch.view_as_real(tensor)
        module = key.rsplit(".", 1)[0] if "." in key else ""
        return self.graph.constant(tensor.detach(), key, Location(module))

    def outputs(self, node: torch.fx.Node) -> None:
        """The user outputs. A buffer the forward writes but never reads before writing (longrope's
        ``inv_freq``, recomputed from the positions on every call) carries nothing from one call
        to the next, so its write is dropped; any other state the forward changes is refused."""
        specs = self.ep.graph_signature.output_specs
        placeholders = [n for n in self.ep.graph.nodes if n.op == "placeholder"]
        unread = {s.target for n, s in zip(placeholders, self.ep.graph_signature.input_specs)
                  if s.kind == InputKind.BUFFER and not n.users}
        carried = [s.target for s in specs if s.kind != OutputKind.USER_OUTPUT
                   and not (s.kind == OutputKind.BUFFER_MUTATION and s.target in unread)]
        if carried:
            raise TraceError(f"the model mutates state during forward ({', '.join(map(str, carried))}); "
                             "lowbit needs a model without side effects")
        outs = []
        for arg in (a for a, s in zip(node.args[0], specs) if s.kind == OutputKind.USER_OUTPUT):
            if not isinstance(arg, torch.fx.Node):
                raise TraceError(f"model output {arg!r} is not a tensor computed by the graph")
            outs.append(self.value(arg))
        self.graph.set_outputs(outs)


def _op_name(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._opname}.{target._overloadname}" if target.namespace == "aten" else \
            f"ops.{target.namespace}.{target._opname}.{target._overloadname}"  # another library's op
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return f"operator.{target.__name__}"
    if getattr(target, "__module__", None) == "torch" and getattr(target, "__name__", "").startswith("sym_"):
        return f"torch.{target.__name__}"  # torch.sym_max on sizes (a sliding window's length)
    raise TraceError(f"unsupported call target {target!r}")


def module_path(node: torch.fx.Node) -> str:
    """The path of the module ``node`` was traced in (``model.layers.0.mlp``; "" at the top)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith("_") else _clean_path(path)


def _clean_path(path: str) -> str:
    """torch.export writes module paths like ``L['self'].model.layers[0]``; keep ``model.layers.0``."""
    for old, new in (("L['self'].", ""), ("L['self']", ""), ("L__self__.", ""), ("[", "."), ("]", "")):
        path = path.replace(old, new)
    return path.replace("'", "").strip(".")


def convert_program(ep: ExportedProgram, axis_names: list[dict[int, str]]
                    ) -> tuple[Graph, dict[str, tuple[int, int | None]]]:
    """Convert ``ep``; ``axis_names[i]`` names the dynamic axes of the i-th user input.
    Also returns each named dim's range (min, max or None) as torch.export inferred it."""
    converter = _Converter(ep, axis_names)
    graph = converter.run()
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        name = str(sym.xreplace(converter.symbols))
        upper = int(vr.upper) if vr.upper.is_Integer else None  # int_oo: unbounded
        ranges[name] = (int(vr.lower) if vr.lower.is_Integer else 0, upper)
    return graph, ranges
