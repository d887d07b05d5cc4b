"""Reads the printer's text back into a graph, so tests can write input graphs by hand.

Constants take their data from ``tensors`` (by name) when given; otherwise they get
deterministic pseudo-random data seeded from their name (integers in [0, 10) or the int4
range, floats ~ N(0,1)),
which is enough for structural tests and numerics before/after a pass.
"""

from __future__ import annotations

import json
import re
import zlib

import torch

from lowbit.errors import ParseError
from lowbit.ir.attrs import AttrValue, CallArgs, EnumAttr, ENUM_KINDS, Ref
from lowbit.ir.graph import Graph, Location, Node, Value
from lowbit.ir.opdef import is_opaque, lookup
from lowbit.ir.types import DType, NoneType, ScalarKind, ScalarType, TensorType, Type

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NAME = re.compile(r"[A-Za-z0-9_]+")
_NUMBER = re.compile(r"-?(inf|nan|\d+(\.\d*)?([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?)")
_KWARG = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=")


class _Cursor:
    def __init__(self, line: str, line_no: int):
        self.s, self.i, self.line_no = line, 0, line_no

    def error(self, msg: str) -> ParseError:
        return ParseError(f"line {self.line_no}, col {self.i + 1}: {msg}\n  {self.s}\n  {' ' * self.i}^")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def peek(self, text: str) -> bool:
        self.ws()
        return self.s.startswith(text, self.i)

    def eat(self, text: str) -> bool:
        if self.peek(text):
            self.i += len(text)
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.eat(text):
            raise self.error(f"expected {text!r}")

    def match(self, pattern: re.Pattern, what: str) -> str:
        self.ws()
        m = pattern.match(self.s, self.i)
        if not m:
            raise self.error(f"expected {what}")
        self.i = m.end()
        return m.group(0)

    def done(self) -> bool:
        self.ws()
        return self.i >= len(self.s)


class _Parser:
    def __init__(self, tensors: dict[str, torch.Tensor] | None, require_tensors: bool = False):
        self.graph = Graph()
        self.values: dict[str, Value] = {}
        self.tensors = tensors or {}
        self.require_tensors = require_tensors

    # ---- values and types ------------------------------------------------------------
    def ref(self, c: _Cursor) -> Value:
        c.expect("%")
        name = c.match(_NAME, "a value name")
        if name not in self.values:
            c.i -= len(name)
            raise c.error(f"%{name} is used before it is defined")
        return self.values[name]

    def type(self, c: _Cursor) -> Type:
        if c.eat("!"):
            word = c.match(_NAME, "a scalar type")
            if word == "none":
                return NoneType()
            try:
                return ScalarType(ScalarKind(word))
            except ValueError:
                raise c.error(f"unknown scalar type !{word}") from None
        word = c.match(_NAME, "a dtype")
        try:
            dtype = DType[word]
        except KeyError:
            c.i -= len(word)
            raise c.error(f"unknown dtype {word!r}") from None
        c.expect("[")
        dims: list[int | str] = []
        while not c.eat("]"):
            if dims:
                c.expect(",")
            text = self._dim_text(c)
            dims.append(int(text) if text.lstrip("-").isdigit() else text)
        return TensorType(tuple(dims), dtype)

    @staticmethod
    def _dim_text(c: _Cursor) -> str:
        c.ws()
        depth, start = 0, c.i
        while c.i < len(c.s):
            ch = c.s[c.i]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif ch in ",]" and depth == 0:
                break
            c.i += 1
        text = c.s[start:c.i].strip()
        if not text:
            raise c.error("expected a dimension")
        return text

    def literal(self, c: _Cursor, refs: list[Value] | None) -> AttrValue:
        c.ws()
        if c.peek("%"):
            if refs is None:
                raise c.error("operand references are only allowed in an opaque op's call")
            refs.append(self.ref(c))
            return Ref(len(refs) - 1)
        if c.eat("["):
            items: list[AttrValue] = []
            while not c.eat("]"):
                if items:
                    c.expect(",")
                items.append(self.literal(c, refs))
            return tuple(items)
        if c.peek('"'):
            return self._string(c)
        m = _NUMBER.match(c.s, c.i)
        if m and not (m.end() < len(c.s) and (c.s[m.end()].isalnum() or c.s[m.end()] == "_")):
            c.i = m.end()
            text = m.group(0)
            is_float = any(ch in text for ch in ".eEn") or "inf" in text
            return float(text) if is_float else int(text)
        word = c.match(_IDENT, "a value")
        if word in ("none", "true", "false"):
            return None if word == "none" else word == "true"
        if word in ENUM_KINDS:
            c.expect("(")
            text = self._string(c)
            c.expect(")")
            return EnumAttr(word, text)
        try:
            return DType[word]
        except KeyError:
            c.i -= len(word)
            raise c.error(f"unknown literal {word!r}") from None

    @staticmethod
    def _string(c: _Cursor) -> str:
        c.ws()
        decoder = json.JSONDecoder()
        try:
            value, end = decoder.raw_decode(c.s, c.i)
        except json.JSONDecodeError:
            raise c.error("malformed string") from None
        c.i = end
        return value

    # ---- lines -------------------------------------------------------------------------
    def header(self, c: _Cursor) -> None:
        c.expect("graph")
        c.expect("@")
        self.graph.name = c.match(_NAME, "a graph name")
        c.expect("(")
        while not c.eat(")"):
            if self.graph.inputs:
                c.expect(",")
            c.expect("%")
            name = c.match(_NAME, "an input name")
            c.expect(":")
            value = Value(name, self.type(c))
            self.define(c, name, value)
            self.graph.fresh_name(name)
            self.graph.inputs.append(value)
        c.expect("{")

    def define(self, c: _Cursor, name: str, value: Value) -> None:
        if name in self.values:
            raise c.error(f"%{name} is defined twice")
        self.values[name] = value

    def node(self, c: _Cursor) -> None:
        names = []
        while True:
            c.expect("%")
            names.append(c.match(_NAME, "a result name"))
            if not c.eat(","):
                break
        c.expect("=")
        op = c.match(_IDENT, "an op name")
        try:
            opdef = lookup(op)
        except Exception as e:
            raise c.error(str(e)) from None
        c.expect("(")
        operands, attrs = self.operands(c, op)
        if c.eat("{"):
            while not c.eat("}"):
                if len(attrs) > (1 if is_opaque(op) else 0):
                    c.expect(",")
                key = c.match(_NAME, "an attribute name")
                c.expect("=")
                attrs[key] = self.literal(c, None)
        c.expect(":")
        types = self.types(c)
        if len(types) != len(names):
            raise c.error(f"{len(names)} results but {len(types)} types")
        if c.eat("#"):
            c.match(_NAME, "a tensor hash")
        loc = Location(c.match(re.compile(r"\S+"), "a module path")) if c.eat("@") else Location()
        if not c.done():
            raise c.error("unexpected text at end of line")
        results = []
        for name, t in zip(names, types):
            value = Value(name, t)
            self.define(c, name, value)
            self.graph.fresh_name(name)
            results.append(value)
        node = Node(op, operands, attrs, results, loc)
        self.graph.insert(node)
        if opdef.name == "core.constant":
            self.bind_constant(c, node)

    def operands(self, c: _Cursor, op: str) -> tuple[list[Value | None], dict]:
        if is_opaque(op):
            refs: list[Value] = []
            args: list[AttrValue] = []
            kwargs: list[tuple[str, AttrValue]] = []
            while not c.eat(")"):
                if args or kwargs:
                    c.expect(",")
                c.ws()
                m = _KWARG.match(c.s, c.i)
                if m:
                    c.i = m.end()
                    kwargs.append((m.group(1), self.literal(c, refs)))
                else:
                    args.append(self.literal(c, refs))
            return list(refs), {"args": CallArgs(tuple(args), tuple(kwargs))}
        operands: list[Value | None] = []
        while not c.eat(")"):
            if operands:
                c.expect(",")
            operands.append(None if c.eat("none") else self.ref(c))
        return operands, {}

    def types(self, c: _Cursor) -> list[Type]:
        if c.eat("("):
            types = []
            while not c.eat(")"):
                if types:
                    c.expect(",")
                types.append(self.type(c))
            return types
        return [self.type(c)]

    def bind_constant(self, c: _Cursor, node: Node) -> None:
        name = node.attrs.get("name")
        if not isinstance(name, str):
            raise c.error('core.constant needs a name="..." attribute')
        t = node.result.tensor_type
        tensor = self.tensors.get(name)
        if tensor is None and self.require_tensors:
            raise c.error(f"no tensor {name!r} for this constant")
        if tensor is None:
            tensor = _seeded_tensor(name, t)
        elif tuple(tensor.shape) != t.shape:
            raise c.error(f"tensor {name!r} has shape {tuple(tensor.shape)}, text says {t}")
        self.graph.tensors[name] = tensor


def _seeded_tensor(name: str, t: TensorType) -> torch.Tensor:
    if not t.is_static:
        raise ParseError(f"constant {name!r} must have a static shape, got {t}")
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = tuple(int(d) for d in t.shape)
    if t.dtype.is_float:
        return torch.randn(shape, generator=gen).to(t.dtype.storage)
    if t.dtype == DType.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    lo, hi = t.dtype.int_range if t.dtype.bits < 8 else (0, 9)
    return torch.randint(lo, hi + 1, shape, generator=gen).to(t.dtype.storage)


def parse_graph(text: str, tensors: dict[str, torch.Tensor] | None = None, *,
                require_tensors: bool = False) -> Graph:
    """Parse the printer's output. Errors name the line and column and show a caret. A constant
    missing from ``tensors`` gets seeded random data, or with ``require_tensors`` is an error."""
    p = _Parser(tensors, require_tensors)
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.strip().startswith("//")]
    if not lines:
        raise ParseError("empty graph text")
    p.header(_Cursor(lines[0][1], lines[0][0]))
    for line_no, line in lines[1:]:
        c = _Cursor(line, line_no)
        if c.eat("}"):
            break
        if c.eat("return"):
            outs = []
            while not c.done():
                if outs:
                    c.expect(",")
                outs.append(p.ref(c))
            p.graph.set_outputs(outs)
        else:
            p.node(c)
    return p.graph


def clone_graph(graph: Graph, share_tensors: bool = False) -> Graph:
    """An independent copy of ``graph`` through the text form: its tensors cloned, or with
    ``share_tensors`` shared (for a copy whose passes only rewire nodes)."""
    from lowbit.ir.printer import print_graph

    copy = parse_graph(print_graph(graph, digest=None), {k: graph.tensors.raw(k) for k in graph.tensors})
    # in node order; ones read from files always shared
    copy.tensors = graph.tensors.copy(list(copy.tensors), share=share_tensors)
    copy.name = graph.name
    return copy
