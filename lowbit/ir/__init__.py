"""lowbit's IR: typed SSA values, op declarations, verifier, printer/parser, interpreter.

This package knows nothing of passes or backends.
"""

from lowbit.ir import dialects  # noqa: F401  (registers the ops)
from lowbit.ir.attrs import AttrKind, CallArgs, EnumAttr, Ref
from lowbit.ir.graph import Graph, Location, Node, Use, Value
from lowbit.ir.interpreter import Executor, run_graph
from lowbit.ir.nx import to_networkx
from lowbit.ir.opdef import AttrDef, OpDef, define, lookup, registered_ops
from lowbit.ir.parser import clone_graph, parse_graph
from lowbit.ir.printer import print_graph
from lowbit.ir.types import DType, NoneType, ScalarKind, ScalarType, TensorType
from lowbit.ir.verify import verify

__all__ = [
    "AttrDef", "AttrKind", "CallArgs", "DType", "EnumAttr", "Executor", "Graph", "Location",
    "Node", "NoneType", "OpDef", "Ref", "ScalarKind", "ScalarType", "TensorType", "Use", "Value",
    "clone_graph", "define", "lookup", "parse_graph", "print_graph", "registered_ops", "run_graph",
    "to_networkx", "verify",
]
