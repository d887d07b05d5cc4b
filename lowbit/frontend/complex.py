"""Complex arithmetic in a traced program, rewritten into real arithmetic.

Some models compute rotary embeddings with complex numbers (DeepSeek-V2, Llama 4):
``view_as_real(view_as_complex(q) * polar(1, θ))``. lowbit's IR, its backends and ONNX have
no complex dtype, so before conversion every complex value z is carried as two real tensors of
z's shape, its parts (re, im), and every op on z becomes ops on the parts:

- ``view_as_complex(x)`` = (x[..., 0], x[..., 1]); ``view_as_real(z)`` = stack([re, im], -1);
  ``polar(r, θ)`` = (r·cos θ, r·sin θ); ``complex(a, b)`` = (a, b); ``real``/``imag`` pick one;
- products (``mul``, ``mm``, ``bmm``, ``matmul``), with a real operand's imaginary part zero:
  (a + bi)(c + di) = (ac − bd) + (ad + bc)i; a quotient multiplies by the conjugate and divides
  by c² + d²; sums and differences act on each part; ``exp``, ``conj``, ``abs``, ``angle`` by
  their formulas;
- ops that move or pick elements (views, slices, indexing, ``cat``, sums over dims) run on each
  part with the same arguments, so dims need no renumbering.

The rewrite is exact up to float rounding. A complex op with no rule, a complex user input or
a complex output is refused with the op's name and module.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from lowbit.errors import TraceError
from lowbit.frontend.convert import module_path

aten = torch.ops.aten
Part = torch.fx.Node | float | int | None  # None: a zero part
Parts = tuple[Part, Part]

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}

# ops that move, pick or sum elements: the same call on each part
_PER_PART = {
    "unsqueeze", "squeeze", "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t",
    "select", "slice", "clone", "alias", "repeat", "index", "index_select", "narrow", "flip", "roll",
    "sum", "mean", "cat", "stack", "unbind", "split", "split_with_sizes", "chunk", "contiguous",
    "movedim", "squeeze_copy", "unsqueeze_copy", "view_copy", "expand_copy", "permute_copy",
    "slice_copy", "select_copy", "neg", "repeat_interleave", "gather", "diagonal",
}
_BILINEAR = {"mul": aten.mul.Tensor, "mm": aten.mm.default, "bmm": aten.bmm.default,
             "matmul": aten.matmul.default}


def _is_complex(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_complex()


def _where(node: torch.fx.Node) -> str:
    path = module_path(node)
    return f"node {node.name} " + (f"in module {path}" if path else "(the model's top level)")


class _Rewriter:
    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.graph = ep.graph
        vals = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
        self.fake_mode = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        self.parts: dict[torch.fx.Node, Parts] = {}
        self.multi: dict[torch.fx.Node, tuple[torch.fx.Node, torch.fx.Node | None]] = {}
        self.at: torch.fx.Node | None = None  # the node being rewritten: new nodes go before it

    # ---- emitting ----------------------------------------------------------------------
    def emit(self, target: Callable, *args, **kwargs) -> torch.fx.Node:
        def fake(a):
            return a.meta["val"] if isinstance(a, torch.fx.Node) else a

        fake_args = torch.fx.node.map_aggregate(args, fake)
        fake_kwargs = torch.fx.node.map_aggregate(kwargs, fake)
        with self.fake_mode:
            val = target(*fake_args, **fake_kwargs)
        with self.graph.inserting_before(self.at):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = val
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.at.meta:
                node.meta[key] = self.at.meta[key]
        return node

    def mul(self, x: Part, y: Part, op=aten.mul.Tensor) -> Part:
        if x is None or y is None:
            return None
        if not isinstance(x, torch.fx.Node) and not isinstance(y, torch.fx.Node):
            return x * y
        if op is aten.mul.Tensor and not isinstance(x, torch.fx.Node):
            x, y = y, x
        if op is aten.mul.Tensor and y == 1 and not isinstance(y, torch.fx.Node):
            return x
        return self.emit(op, x, y)

    def add(self, x: Part, y: Part, sign: int = 1) -> Part:
        if y is None:
            return x
        if x is None:
            return self.neg(y) if sign < 0 else y
        if not isinstance(x, torch.fx.Node) and not isinstance(y, torch.fx.Node):
            return x + sign * y
        if not isinstance(x, torch.fx.Node):  # number ± tensor
            return self.emit(aten.add.Tensor, self.neg(y) if sign < 0 else y, x)
        return self.emit(aten.add.Tensor if sign > 0 else aten.sub.Tensor, x, y)

    def neg(self, x: Part) -> Part:
        if x is None or not isinstance(x, torch.fx.Node):
            return None if x is None else -x
        return self.emit(aten.neg.default, x)

    def tensor(self, x: Part, like: torch.fx.Node) -> torch.fx.Node:
        """A part as a tensor node (a zero part as zeros shaped like ``like``)."""
        if isinstance(x, torch.fx.Node):
            return x
        zeros = self.emit(aten.zeros_like.default, like)
        return zeros if not x else self.emit(aten.add.Tensor, zeros, x)

    # ---- operands ----------------------------------------------------------------------
    def operand(self, arg: object) -> Parts:
        if isinstance(arg, torch.fx.Node) and arg in self.parts:
            return self.parts[arg]
        if isinstance(arg, complex):
            return arg.real, arg.imag
        return arg, None  # a real tensor or number

    def complex_args(self, node: torch.fx.Node) -> bool:
        found = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a in self.parts or a in self.multi))
        return any(found) or any(isinstance(a, complex) for a in node.args)

    # ---- rules -------------------------------------------------------------------------
    def rewrite(self, node: torch.fx.Node) -> Parts | torch.fx.Node | None:
        """The parts of ``node``'s complex result, or the real node that replaces it."""
        name = node.target._opname if isinstance(node.target, torch._ops.OpOverload) else ""
        args, kw = node.args, node.kwargs
        if node.target is operator.getitem and args[0] in self.multi:
            re, im = self.multi[args[0]]
            return self.emit(operator.getitem, re, args[1]), \
                None if im is None else self.emit(operator.getitem, im, args[1])
        if name == "view_as_complex":
            return self.emit(aten.select.int, args[0], -1, 0), self.emit(aten.select.int, args[0], -1, 1)
        if name == "view_as_real":
            re, im = self.operand(args[0])
            return self.emit(aten.stack.default, [re, self.tensor(im, re)], -1)
        if name in ("real", "imag"):
            re, im = self.operand(args[0])
            return re if name == "real" else self.tensor(im, re)
        if name == "polar":
            return self.mul(args[0], self.emit(aten.cos.default, args[1])), \
                self.mul(args[0], self.emit(aten.sin.default, args[1]))
        if name == "complex":
            return args[0], args[1]
        if name in _BILINEAR:
            return self.product(_BILINEAR[name], self.operand(args[0]), self.operand(args[1]))
        if name == "div":
            return self.quotient(self.operand(args[0]), self.operand(args[1]))
        if name in ("add", "sub"):
            (a, b), (c, d) = self.operand(args[0]), self.operand(args[1])
            alpha, sign = kw.get("alpha", 1), 1 if name == "add" else -1
            return self.add(a, self.mul(c, alpha), sign), self.add(b, self.mul(d, alpha), sign)
        if name in ("conj", "_conj", "conj_physical", "resolve_conj", "resolve_neg"):
            re, im = self.operand(args[0])
            return re, self.neg(im) if name != "resolve_conj" and name != "resolve_neg" else im
        if name == "exp":
            re, im = self.operand(args[0])
            r = self.emit(aten.exp.default, re)
            return self.mul(r, self.emit(aten.cos.default, im)), self.mul(r, self.emit(aten.sin.default, im))
        if name == "abs":
            re, im = self.operand(args[0])
            return self.emit(aten.sqrt.default, self.add(self.mul(re, re), self.mul(im, im)))
        if name == "angle":
            re, im = self.operand(args[0])
            return self.emit(aten.atan2.default, self.tensor(im, re), re)
        if name in ("_to_copy", "to", "type_as", "lift_fresh_copy"):
            return self.cast(node)
        if name in _PER_PART:
            return self.per_part(node)
        raise TraceError(f"complex values reach {node.target} at {_where(node)}, an op lowbit has no real form "
                         "for; lowbit computes complex arithmetic as pairs of real tensors")

    def product(self, op, x: Parts, y: Parts) -> Parts:
        (a, b), (c, d) = x, y
        return self.add(self.mul(a, c, op), self.mul(b, d, op), -1), self.add(self.mul(a, d, op), self.mul(b, c, op))

    def quotient(self, x: Parts, y: Parts) -> Parts:
        (a, b), (c, d) = x, y
        if d is None:
            return self.div(a, c), self.div(b, c)
        norm = self.add(self.mul(c, c), self.mul(d, d))
        re, im = self.product(aten.mul.Tensor, (a, b), (c, self.neg(d)))
        return self.div(re, norm), self.div(im, norm)

    def div(self, x: Part, y: Part) -> Part:
        if x is None:
            return None
        if not isinstance(x, torch.fx.Node) and not isinstance(y, torch.fx.Node):
            return x / y
        return self.emit(aten.div.Tensor, self.tensor(x, y) if not isinstance(x, torch.fx.Node) else x, y)

    def cast(self, node: torch.fx.Node) -> Parts | torch.fx.Node:
        re, im = self.operand(node.args[0])
        dtype = node.kwargs.get("dtype", node.meta["val"].dtype if isinstance(node.meta.get("val"), torch.Tensor)
                                else None)
        kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        if dtype in _REAL:
            kwargs["dtype"] = _REAL[dtype]
            return (self.emit(aten._to_copy.default, re, **kwargs),
                    None if not isinstance(im, torch.fx.Node) else self.emit(aten._to_copy.default, im, **kwargs))
        return self.emit(aten._to_copy.default, re, dtype=dtype, **kwargs)  # to a real dtype: the real part

    def per_part(self, node: torch.fx.Node) -> Parts | None:
        """The same call on the real parts and on the imaginary parts (a list of operands, as
        ``cat`` takes, is split part by part; a real operand in it has a zero imaginary part)."""
        def pick(which: int):
            def part(a):
                if isinstance(a, torch.fx.Node) and a in self.parts:
                    re, im = self.parts[a]
                    return re if which == 0 else self.tensor(im, re)
                return a

            def arg(a):
                if isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) and x in self.parts for x in a):
                    return type(a)(part(x) if which == 0 or x in self.parts else self.tensor(None, x) for x in a)
                return part(a)  # a real tensor outside a list of operands (an index) stays as it is
            return arg

        args_re = tuple(map(pick(0), node.args))
        imaginary = [self.parts[a][1] for a in node.all_input_nodes if a in self.parts]
        re = self.emit(node.target, *args_re, **node.kwargs)
        im = None if all(p is None for p in imaginary) else \
            self.emit(node.target, *map(pick(1), node.args), **node.kwargs)
        if isinstance(re.meta["val"], (list, tuple)):
            self.multi[node] = (re, im)
            return None
        return re, im

    # ---- program -----------------------------------------------------------------------
    def constant(self, node: torch.fx.Node) -> None:
        spec = {s.arg.name: s for s in self.ep.graph_signature.input_specs}[node.name]
        if spec.kind == InputKind.USER_INPUT:
            raise TraceError(f"input {node.name} is complex; lowbit takes real tensors "
                             "(pass torch.view_as_real of it and view it as complex in the model)")
        with self.fake_mode:
            node.meta["val"] = torch.view_as_real(node.meta["val"])  # convert_program views the tensor so too
        self.pending.append(node)

    def run(self) -> bool:
        self.pending: list[torch.fx.Node] = []
        old = []
        for node in list(self.graph.nodes):
            if node.op == "placeholder" and _is_complex(node.meta.get("val")):
                self.constant(node)
                continue
            if node.op == "output":
                bad = [a for a in node.all_input_nodes if a in self.parts or a in self.multi]
                if bad:
                    raise TraceError(f"the model returns a complex tensor ({bad[0].name}); lowbit's outputs are real")
                continue
            if node.op != "call_function":
                continue
            self.at = node
            if self.pending:
                for ph in self.pending:
                    self.parts[ph] = (self.emit(aten.select.int, ph, -1, 0), self.emit(aten.select.int, ph, -1, 1))
                self.pending = []
            if not (self.complex_args(node) or _is_complex(node.meta.get("val"))):
                continue
            if isinstance(node.target, torch._ops.OpOverload) and node.target._opname == "_assert_tensor_metadata":
                old.append(node)
                continue
            result = self.rewrite(node)
            old.append(node)
            if isinstance(result, tuple):
                self.parts[node] = result
            elif isinstance(result, torch.fx.Node):
                node.replace_all_uses_with(result)
        for node in reversed(old):
            self.graph.erase_node(node)
        return bool(old)


def lower_complex(ep: ExportedProgram) -> bool:
    """Rewrite ``ep``'s complex values into pairs of real tensors, in place (see the module
    docstring); whether anything was complex."""
    if not any(_is_complex(n.meta.get("val")) for n in ep.graph.nodes):
        return False
    changed = _Rewriter(ep).run()
    ep.graph.lint()
    ep.graph_module.recompile()
    return changed
