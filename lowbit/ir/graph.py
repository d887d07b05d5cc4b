"""The SSA graph: values with use lists, nodes in a doubly linked order, constants held by the graph.

Every edit goes through this API (``Graph.insert``, ``Value.replace_all_uses_with``,
``Node.set_operand``, ``Graph.erase``) so that use lists stay right.

    g = Graph()
    x = g.add_input("x", TensorType(("batch", 4), DType.f32))
    w = g.constant(torch.randn(8, 4), "w")
    y = g.append("core.linear", [x, w, None]).result
    g.set_outputs([y])
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lowbit.ir.attrs import AttrValue, CallArgs
from lowbit.ir.store import LazyTensor, TensorStore
from lowbit.ir.types import DType, TensorType, Type


@dataclass
class Location:
    """Where a node came from (module path) and which passes created or changed it."""

    module: str = ""
    touched_by: list[str] = field(default_factory=list)

    def copy(self) -> Location:
        return Location(self.module, list(self.touched_by))


@dataclass(eq=False)
class Use:
    node: Node
    index: int


class Value:
    """A typed SSA value: a graph input or a result of a node."""

    def __init__(self, name: str, type: Type, producer: Node | None = None, index: int = 0):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index
        self.uses: list[Use] = []

    @property
    def tensor_type(self) -> TensorType:
        if not isinstance(self.type, TensorType):
            raise TypeError(f"%{self.name} is {self.type}, not a tensor")
        return self.type

    @property
    def users(self) -> list[Node]:
        """Distinct consuming nodes, in use order."""
        seen: dict[int, Node] = {}
        for use in self.uses:
            seen.setdefault(id(use.node), use.node)
        return list(seen.values())

    def replace_all_uses_with(self, other: Value) -> None:
        for use in list(self.uses):
            use.node.set_operand(use.index, other)

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation. ``operands`` may hold ``None`` for an absent optional operand."""

    def __init__(
        self,
        op: str,
        operands: Sequence[Value | None],
        attrs: dict[str, AttrValue | CallArgs],
        results: list[Value],
        loc: Location,
    ):
        self.op = op
        self.operands: list[Value | None] = []
        self.attrs = attrs
        self.results = results
        self.loc = loc
        self.graph: Graph | None = None
        self.prev: Node | None = None
        self.next: Node | None = None
        for r in results:
            r.producer = self
        for v in operands:
            self._add_operand(v)

    def _add_operand(self, value: Value | None) -> None:
        if value is not None:
            value.uses.append(Use(self, len(self.operands)))
        self.operands.append(value)

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.op} has {len(self.results)} results, not one")
        return self.results[0]

    def operand(self, i: int) -> Value:
        value = self.operands[i]
        if value is None:
            raise ValueError(f"{self.op}: operand {i} is absent")
        return value

    def set_operand(self, i: int, value: Value | None) -> None:
        old = self.operands[i]
        if old is value:
            return
        if old is not None:
            old.uses = [u for u in old.uses if not (u.node is self and u.index == i)]
        if value is not None:
            value.uses.append(Use(self, i))
        self.operands[i] = value

    def drop_operands(self) -> None:
        for i in range(len(self.operands)):
            self.set_operand(i, None)

    def touch(self, pass_name: str) -> None:
        if pass_name not in self.loc.touched_by:
            self.loc.touched_by.append(pass_name)

    def __repr__(self) -> str:
        names = ", ".join(r.name for r in self.results)
        return f"<Node {names} = {self.op}>"


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short content hash of a tensor, shown by the printer instead of its data."""
    data = tensor.detach().contiguous().cpu()
    if data.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        data = data.view(torch.uint8) if data.element_size() == 1 else data.view(torch.int16)
    h = hashlib.sha1(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()[:8]


class Graph:
    """A function: inputs, nodes in execution order, outputs, and the constants' tensors."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.tensors = TensorStore()  # in memory, or read from files when used (ir/store.py)
        self._head: Node | None = None
        self._tail: Node | None = None
        self._names: set[str] = set()
        self._counter = itertools.count()
        self.version = 0  # bumped on every structural edit; executors cache on it

    # ---- names -------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "v"
        if base[0].isdigit():
            base = "v" + base
        name = base
        while name in self._names:
            name = f"{base}_{next(self._counter)}"
        self._names.add(name)
        return name

    # ---- building ----------------------------------------------------------------------
    def add_input(self, name: str, type: Type) -> Value:
        value = Value(self.fresh_name(name), type)
        self.inputs.append(value)
        self.version += 1
        return value

    def create_node(
        self,
        op: str,
        operands: Sequence[Value | None],
        attrs: dict[str, AttrValue | CallArgs] | None = None,
        result_types: Sequence[Type] | None = None,
        loc: Location | None = None,
        name: str | None = None,
    ) -> Node:
        """Make a node (not yet placed). Without ``result_types`` the op's type inference runs."""
        from lowbit.ir.opdef import infer_types

        attrs = dict(attrs or {})
        if result_types is None:
            result_types = infer_types(op, operands, attrs)
        hint = name or (op.split(".")[1] if "." in op else op)
        results = [Value(self.fresh_name(hint if i == 0 else f"{hint}_{i}"), t)
                   for i, t in enumerate(result_types)]
        return Node(op, operands, attrs, results, loc or Location())

    def insert(self, node: Node, *, before: Node | None = None, after: Node | None = None) -> Node:
        """Place ``node`` before/after an anchor, or at the end when neither is given."""
        if node.graph is not None:
            raise ValueError(f"{node} is already placed")
        if before is not None:
            prev, nxt = before.prev, before
        elif after is not None:
            prev, nxt = after, after.next
        else:
            prev, nxt = self._tail, None
        node.prev, node.next = prev, nxt
        if prev is None:
            self._head = node
        else:
            prev.next = node
        if nxt is None:
            self._tail = node
        else:
            nxt.prev = node
        node.graph = self
        self.version += 1
        return node

    def append(self, op: str, operands: Sequence[Value | None], attrs=None, result_types=None,
               loc: Location | None = None, *, before: Node | None = None,
               name: str | None = None) -> Node:
        node = self.create_node(op, operands, attrs, result_types, loc, name)
        return self.insert(node, before=before)

    def constant(self, tensor: torch.Tensor, name: str, loc: Location | None = None,
                 *, before: Node | None = None, dtype: DType | None = None) -> Value:
        """Add a ``core.constant`` holding ``tensor``: after the leading constants, or ``before``."""
        key = name
        i = 0
        while key in self.tensors:
            i += 1
            key = f"{name}_{i}"
        self.tensors[key] = tensor.detach()
        node = self.create_node("core.constant", [], {"name": key}, [tensor_type_of(tensor, dtype)],
                                loc, name=key)
        if before is not None:
            self.insert(node, before=before)
            return node.result
        last = None  # constants go first, in the order they were added
        cursor = self._head
        while cursor is not None and cursor.op == "core.constant":
            last, cursor = cursor, cursor.next
        if last is None:
            self.insert(node, before=self._head)
        else:
            self.insert(node, after=last)
        return node.result

    def set_outputs(self, values: Sequence[Value]) -> None:
        self.outputs = list(values)
        self.version += 1

    # ---- editing -----------------------------------------------------------------------
    def erase(self, node: Node) -> None:
        """Remove a node whose results are unused; a constant's tensor goes with it."""
        for r in node.results:
            if r.uses or any(o is r for o in self.outputs):
                raise ValueError(f"cannot erase {node}: %{r.name} is still used")
        node.drop_operands()
        if node.prev is None:
            self._head = node.next
        else:
            node.prev.next = node.next
        if node.next is None:
            self._tail = node.prev
        else:
            node.next.prev = node.prev
        node.prev = node.next = None
        node.graph = None
        if node.op == "core.constant":
            self.tensors.pop(str(node.attrs["name"]), None)
        self.version += 1

    def replace_output(self, old: Value, new: Value) -> None:
        self.outputs = [new if o is old else o for o in self.outputs]
        self.version += 1

    def replace_value(self, old: Value, new: Value) -> None:
        """Point every use of ``old``, graph outputs included, at ``new``."""
        old.replace_all_uses_with(new)
        if any(o is old for o in self.outputs):
            self.replace_output(old, new)

    # ---- constants ---------------------------------------------------------------------
    def tensor(self, value: Value) -> torch.Tensor:
        node = value.producer
        if node is None or node.op != "core.constant":
            raise ValueError(f"%{value.name} is not a constant")
        return self.tensors[str(node.attrs["name"])]

    def is_constant(self, value: Value | None) -> bool:
        return value is not None and value.producer is not None and value.producer.op == "core.constant"

    def set_tensor(self, value: Value, tensor: torch.Tensor) -> None:
        """Replace a constant's data; its type follows the new tensor."""
        node = value.producer
        if node is None or node.op != "core.constant":
            raise ValueError(f"%{value.name} is not a constant")
        self.tensors[str(node.attrs["name"])] = tensor.detach()
        old = value.tensor_type.dtype
        value.type = tensor_type_of(tensor, old if old.storage == tensor.dtype else None)
        self.version += 1

    # ---- traversal ---------------------------------------------------------------------
    @property
    def nodes(self) -> Iterator[Node]:
        """Nodes in order; the current node may be erased while iterating."""
        node = self._head
        while node is not None:
            nxt = node.next
            yield node
            node = nxt

    def reversed_nodes(self) -> Iterator[Node]:
        """Nodes in reverse order; the current node may be erased while iterating."""
        node = self._tail
        while node is not None:
            prev = node.prev
            yield node
            node = prev

    def __len__(self) -> int:
        return sum(1 for _ in self.nodes)

    def param_bytes(self) -> int:
        return sum(self.tensors.nbytes(name) for name in self.tensors)

    def __str__(self) -> str:
        from lowbit.ir.printer import print_graph

        return print_graph(self)


def constant_digest(graph: Graph, name: str, digest=tensor_digest) -> str:
    """``digest`` of the constant ``name``; a constant read from a file is hashed once."""
    item = graph.tensors.raw(name)
    if not isinstance(item, LazyTensor):
        return digest(item)
    if digest is not tensor_digest:
        return digest(item.load())
    if item.digest is None:
        item.digest = tensor_digest(item.load())
    return item.digest


def tensor_type_of(tensor: torch.Tensor, dtype: DType | None = None) -> TensorType:
    """The type of a constant holding ``tensor``; ``dtype`` names a narrower type stored in it
    (int4 values in an int8 tensor)."""
    if dtype is not None and dtype.storage != tensor.dtype:
        raise ValueError(f"{dtype.short} values are stored as {dtype.storage}, not {tensor.dtype}")
    return TensorType(tuple(int(d) for d in tensor.shape), dtype or DType.from_torch(tensor.dtype))
