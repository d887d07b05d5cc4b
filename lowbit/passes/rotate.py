"""Rotation passes (QuaRot style), all lossless.

``fuse-norms``: make every norm that reads the residual stream weightless, so that
RMSNorm(x·Q) = RMSNorm(x)·Q for any orthogonal Q. A norm's scale γ and bias β move into the
linears that read it, W' = W·diag(γ), b' = b + W·β (or into one d×d linear after the norm where
something else reads it too). A LayerNorm becomes an RMSNorm as SliceGPT does: every value
entering the stream is centered at its source (E' = E·M, W' = M·W, b' = b·M with
M = I − 11ᵀ/d), so the stream has mean zero and LayerNorm's mean subtraction is a no-op.

``rotate-residual{seed}``: the residual stream (found from the graph: values joined by
residual adds and read by norms) is rotated by a randomized Hadamard Q = diag(±1)·H/√d
(H of any size d, see ``lowbit.ir.dialects.hadamard``; a note names the orthogonal substitute
where it is not a Hadamard matrix): x' = x·Q. Then
    embedding rows  E' = E·Q        readers  W' = W·Q        writers  W' = Qᵀ·W,  b' = b·Q
and the outputs are unchanged. A weight shared by a writer and a reader (tied embeddings) is
copied first, so each side gets its own transform.

``online-hadamard{where=auto}``: where a rotation cannot be folded (a linear whose input
follows a nonlinearity, or any linear of a post-norm model, whose stream passes through
LayerNorms), insert ``rotate.hadamard`` (x' = x·Hᵀ/√n) and fold its inverse into the
consumers, W' = W·Hᵀ/√n. ``auto`` picks every linear whose input is not already rotated;
otherwise ``where`` is a module-path pattern (``none``: no linears). Linears sharing an input
share one transform. ``qk=true`` also rotates each head's query and key where they enter
attention (after the rotary embedding), which leaves Q·Kᵀ unchanged and spreads the key's
outliers for a quantized K.

Preconditions are checked; a pass that cannot apply says why and leaves the graph as is.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import torch

from lowbit.ir.dialects.hadamard import describe, hadamard_transform, plan
from lowbit.ir.graph import Graph, Node, Value
from lowbit.passes.base import Pass, PassContext, register

NORMS = ("core.rms_norm", "core.layer_norm")
VIEWS = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")


def _is_view(node: Node | None) -> bool:
    """A reshape that keeps the last dim (what the rotations act on) as it is."""
    return (node is not None and node.op in VIEWS and node.results[0].tensor_type.rank > 0
            and str(node.results[0].tensor_type.shape[-1]) == str(node.operand(0).tensor_type.shape[-1]))


def linear_readers(v: Value, ops: tuple[str, ...] = ("core.linear",)) -> list[Node] | None:
    """The linears (nodes of ``ops``) whose input ``v`` is (through last-dim-keeping reshapes),
    or None if anything else reads it."""
    out = []
    for u in v.users:
        if _is_view(u):
            more = linear_readers(u.results[0], ops)
            if more is None:
                return None
            out += more
        elif u.op in ops and u.operands[0] is v and all(o is not v for o in u.operands[1:]):
            out.append(u)
        else:
            return None
    return out


def source(v: Value) -> Node | None:
    """The node producing ``v``, looking through last-dim-keeping reshapes."""
    p = v.producer
    while _is_view(p):
        p = p.operand(0).producer
    return p


@dataclass
class ResidualStream:
    values: list[Value]          # the stream's values
    entries: list[Value]         # values entering it (from embeddings, writers, constants...)
    norms: list[Node]            # norms reading it
    readers: list[Node]          # nodes reading a norm's output


def find_residual_stream(graph: Graph) -> ResidualStream | str:
    """The residual stream of a pre-norm model, or why there is none that can be rotated."""
    g = nx.Graph()
    by_id = {id(v): v for n in graph.nodes for v in n.results}
    for node in graph.nodes:
        if node.op == "core.add" and _same_last_dim(node):
            for v in node.operands:
                g.add_edge(id(node.result), id(v))
                by_id[id(v)] = v     # graph inputs and constants too
    read_by_norm = {id(n.operand(0)) for n in graph.nodes if n.op in NORMS}
    components = [c for c in nx.connected_components(g) if c & read_by_norm]
    if not components:
        return "no residual adds whose values are read by a norm"
    if any(by_id[i].producer is not None and by_id[i].producer.op in NORMS for c in components for i in c):
        return ("the stream passes through norms (a post-norm model): their outputs also feed the residual "
                "adds, so a rotation cannot be folded into them; online-hadamard rotates its linears instead")
    stream = max(components, key=len)
    values = [by_id[i] for i in stream if i in by_id]
    outputs = {id(v) for v in graph.outputs}
    entries, norms = [], []
    for v in values:
        for u in v.users:
            if u.op in NORMS and u.operand(0) is v:
                norms.append(u)
            elif not (u.op == "core.add" and id(u.result) in stream):
                return f"%{v.name} is also read by {u.op} (%{u.results[0].name}); it cannot be rotated"
        if id(v) in outputs:
            return f"%{v.name} is a graph output; rotating it would change the output"
        p = v.producer
        if not (p is not None and p.op == "core.add" and id(p.result) in stream):
            entries.append(v)
    readers = [u for n in norms for u in (linear_readers(n.result) or n.result.users)]
    return ResidualStream(values, entries, norms, readers)


def _same_last_dim(node: Node) -> bool:
    """A residual add: two tensors with the result's last dim (one may broadcast on the others)."""
    dims = [v.tensor_type.shape[-1] if v is not None and v.tensor_type.rank else None
            for v in (*node.operands, node.result)]
    return len(node.operands) == 2 and None not in dims and len(set(map(str, dims))) == 1


def _constant_weights(node: Node, graph: Graph) -> bool:
    w = node.operands[0] if node.op == "core.embedding" else node.operands[1]
    bias = node.operands[2] if node.op == "core.linear" else None
    return graph.is_constant(w) and (bias is None or graph.is_constant(bias))


def _own(graph: Graph, node: Node, i: int) -> Value:
    """Operand ``i`` of ``node``, a constant only ``node`` reads (a shared one is copied)."""
    v = node.operand(i)
    if len(v.users) > 1:
        copy = graph.constant(graph.tensor(v).clone(), f"{v.name}_own", loc=node.loc.copy())
        node.set_operand(i, copy)
    return node.operand(i)


def _transform(graph: Graph, node: Node, i: int, fn) -> None:
    v = _own(graph, node, i)
    t = graph.tensor(v)
    graph.set_tensor(v, fn(t.double()).to(t.dtype))


def _fold_plan(graph: Graph, v: Value, d: int, top: bool = True) -> list[Node] | None:
    """The nodes whose constants can absorb y → y·T on ``v`` (embeddings, linears, constants,
    through adds and reshapes), or None. Below the top, each value must feed only the next."""
    p = v.producer
    if p is None or not top and len(v.users) > 1:
        return None
    if p.op == "core.constant":
        t = graph.tensor(v)
        return [p] if t.dim() >= 1 and t.shape[-1] == d and t.is_floating_point() else None
    if p.op in ("core.embedding", "core.linear") and _constant_weights(p, graph):
        return [p]
    if p.op == "core.add" and _same_last_dim(p):
        plans = [_fold_plan(graph, x, d, top=False) for x in p.operands]
        return None if None in plans else [n for plan in plans for n in plan]
    if _is_view(p):
        return _fold_plan(graph, p.operand(0), d, top=False)
    return None


def _linear_after(graph: Graph, v: Value, weight: torch.Tensor, bias: torch.Tensor | None, pass_name: str) -> None:
    """Put ``linear(v, weight, bias)`` after ``v`` and point every other use of ``v`` at it."""
    dtype = v.tensor_type.dtype.storage
    w = graph.constant(weight.contiguous().to(dtype), f"{pass_name}_weight")
    b = graph.constant(bias.to(dtype), f"{pass_name}_bias") if bias is not None else None
    node = graph.create_node("core.linear", [v, w, b], loc=v.producer.loc.copy() if v.producer else None)
    graph.insert(node, after=v.producer) if v.producer else graph.insert(node, before=v.users[0])
    graph.replace_value(v, node.result)
    node.set_operand(0, v)
    node.touch(pass_name)


def right_multiply(graph: Graph, v: Value, t: torch.Tensor, pass_name: str) -> None:
    """Make ``v`` become v·T (T: d×d, float64) by folding T into the constants that produce it,
    or, where they cannot absorb it, by one explicit linear after ``v``."""
    plan = _fold_plan(graph, v, t.shape[0])
    if plan is None:
        _linear_after(graph, v, t.T, None, pass_name)
        return
    for node in plan:
        if node.op == "core.constant":
            graph.set_tensor(node.result, (graph.tensor(node.result).double() @ t).to(graph.tensor(node.result).dtype))
        elif node.op == "core.embedding":
            _transform(graph, node, 0, lambda e: e @ t)
        else:
            _transform(graph, node, 1, lambda w: t.T @ w)
            if node.operands[2] is not None:
                _transform(graph, node, 2, lambda b: b @ t)
        node.touch(pass_name)


@register
@dataclass(frozen=True)
class FuseNorms(Pass):
    name: ClassVar[str] = "fuse-norms"
    summary: ClassVar[str] = "fold the residual stream's norm scales and biases into the linears that read them"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        stream = find_residual_stream(graph)
        if isinstance(stream, str):
            ctx.note(f"{self.name}: {stream}")
            return False
        changed = False
        if len({n.op for n in stream.norms}) > 1:
            ctx.note(f"{self.name}: the residual stream is read by both LayerNorm and RMSNorm; centering it for "
                     "the LayerNorms would change the RMSNorms, so no norm is folded")
            return False
        if any(n.op == "core.layer_norm" for n in stream.norms):
            d = int(stream.values[0].tensor_type.shape[-1])
            center = torch.eye(d, dtype=torch.float64) - 1.0 / d
            for v in stream.entries:
                right_multiply(graph, v, center, self.name)
            changed = True
        for norm in stream.norms:
            changed |= self._fold(graph, norm)
        return changed

    def _fold(self, graph: Graph, norm: Node) -> bool:
        gamma = norm.operand(1) if norm.operands[1] is not None else None
        beta = norm.operand(2) if norm.op == "core.layer_norm" and norm.operands[2] is not None else None
        if norm.op == "core.layer_norm":
            rms = graph.create_node("core.rms_norm", [norm.operand(0), None], {"eps": norm.attrs["eps"]},
                                    loc=norm.loc.copy())
            graph.insert(rms, before=norm)
            graph.replace_value(norm.result, rms.result)
            rms.touch(self.name)
            graph.erase(norm)
            norm = rms
        elif gamma is None:
            return False
        else:
            norm.set_operand(1, None)
            norm.touch(self.name)
        g = graph.tensor(gamma).double() if gamma is not None else None
        b = graph.tensor(beta).double() if beta is not None else None
        users = linear_readers(norm.result)
        if users is None or not all(_constant_weights(u, graph) for u in users) or norm.result in graph.outputs:
            d = int(norm.result.tensor_type.shape[-1])
            _linear_after(graph, norm.result, torch.diag(g) if g is not None else torch.eye(d, dtype=torch.float64),
                          b, self.name)
            return True
        for u in users:
            w0 = graph.tensor(u.operand(1)).double()
            if b is not None:
                shift = w0 @ b
                if u.operands[2] is None:
                    u.set_operand(2, graph.constant(shift.to(graph.tensor(u.operand(1)).dtype), f"{self.name}_bias"))
                else:
                    _transform(graph, u, 2, lambda bias: bias + shift)
            if g is not None:
                _transform(graph, u, 1, lambda w: w * g)
            u.touch(self.name)
        return True


def randomized_hadamard(d: int, seed: int) -> torch.Tensor:
    """Q = diag(±1)·H/√d (H: ``plan(d)``, a Hadamard matrix or its orthogonal substitute)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=gen).double() * 2 - 1
    return hadamard_transform(torch.diag(signs))  # rows: diag(s) · Hᵀ/√d


def note_substitutes(ctx: PassContext, pass_name: str, sizes: dict[int, list[str]]) -> None:
    """Say which rotations are not exact Hadamard matrices (size → where it is used)."""
    for n, where in sizes.items():
        if not plan(n).exact:
            more = f" and {len(where) - 2} more" if len(where) > 2 else ""
            ctx.note(f"{pass_name}: {', '.join(where[:2])}{more}: no Hadamard matrix of size {n} is built; "
                     f"rotating by {describe(n)}")


@register
@dataclass(frozen=True)
class RotateResidual(Pass):
    name: ClassVar[str] = "rotate-residual"
    summary: ClassVar[str] = "rotate the residual stream by a randomized Hadamard matrix"
    idempotent: ClassVar[bool] = False
    seed: int = 0

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        stream = find_residual_stream(graph)
        if isinstance(stream, str):
            ctx.note(f"{self.name}: {stream}")
            return False
        for n in stream.norms:
            if n.op != "core.rms_norm" or n.operands[1] is not None:
                ctx.note(f"{self.name}: %{n.result.name} still has a scale or a mean: run fuse-norms first")
                return False
            if n.result in graph.outputs:
                ctx.note(f"{self.name}: the norm output %{n.result.name} is a graph output: run fuse-norms first")
                return False
        for u in stream.readers:
            if u.op != "core.linear" or not _constant_weights(u, graph):
                ctx.note(f"{self.name}: a norm output is read by {u.op} (%{u.results[0].name}), not only by "
                         "linears: run fuse-norms first")
                return False
        d = int(stream.values[0].tensor_type.shape[-1])
        note_substitutes(ctx, self.name, {d: ["the residual stream"]})
        q = randomized_hadamard(d, self.seed)
        for v in stream.entries:
            right_multiply(graph, v, q, self.name)
        for node in stream.readers:
            _transform(graph, node, 1, lambda w: w @ q)
            node.touch(self.name)
        return True


@register
@dataclass(frozen=True)
class OnlineHadamard(Pass):
    name: ClassVar[str] = "online-hadamard"
    summary: ClassVar[str] = "insert rotate.hadamard before linears whose input is not rotated, fold its inverse into them"
    idempotent: ClassVar[bool] = False
    where: str = "auto"  # 'auto', 'none', or a module-path pattern of the linears whose input is rotated
    qk: bool = False     # also rotate each head's query and key (after the rotary embedding): for K quantization

    def _selected(self, node: Node, graph: Graph) -> bool:
        if node.op != "core.linear" or self.where == "none":
            return False
        if self.where != "auto":
            return fnmatch.fnmatchcase(node.loc.module, self.where)
        x = source(node.operand(0))
        rotated = x is not None and (x.op == "rotate.hadamard" or x.op == "core.rms_norm"
                                     and "rotate-residual" in node.loc.touched_by)
        return not rotated and graph.is_constant(node.operands[1])

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        groups: dict[int, list[Node]] = {}  # input value → the selected linears reading it
        for node in graph.nodes:
            if self._selected(node, graph):
                groups.setdefault(id(node.operand(0)), []).append(node)
        changed = False
        sizes: dict[int, list[str]] = {}
        for linears in groups.values():
            x = linears[0].operand(0)
            where = ", ".join(n.loc.module for n in linears)
            if not all(graph.is_constant(n.operands[1]) and n.operands[0] is x for n in linears):
                ctx.note(f"{self.name}: {where} has no constant weight to absorb the rotation")
                continue
            sizes.setdefault(int(x.tensor_type.shape[-1]), []).append(where)
            h = graph.append("rotate.hadamard", [x], loc=linears[0].loc.copy(), before=linears[0])
            h.touch(self.name)
            for node in linears:
                node.set_operand(0, h.result)
                _transform(graph, node, 1, hadamard_transform)
                node.touch(self.name)
            changed = True
        if self.qk:
            changed |= self._rotate_qk(graph, ctx, sizes)
        note_substitutes(ctx, self.name, sizes)
        return changed

    def _rotate_qk(self, graph: Graph, ctx: PassContext, sizes: dict[int, list[str]]) -> bool:
        """softmax(Q·Kᵀ) is unchanged by Q' = Q·H, K' = K·H (H orthogonal, over head_dim)."""
        changed = False
        for node in list(graph.nodes):
            if node.op != "core.sdpa":
                continue
            head_dim = node.operand(0).tensor_type.shape[-1]
            if not isinstance(head_dim, int):
                ctx.note(f"{self.name}: {node.loc.module}: query/key not rotated: head dim {head_dim} is not static")
                continue
            sizes.setdefault(head_dim, []).append(f"{node.loc.module} query/key")
            for i in (0, 1):
                user, index = _cache_entry(graph, node) if i == 1 else (node, 0)
                if user.operand(index).producer is not None and user.operand(index).producer.op == "rotate.hadamard":
                    continue
                h = graph.append("rotate.hadamard", [user.operand(index)], loc=node.loc.copy(), before=user)
                h.touch(self.name)
                user.set_operand(index, h.result)
            node.touch(self.name)
            changed = True
        return changed


_SHAPE_ONLY = ("aten.unsqueeze.default", "aten.expand.default", "aten.clone.default", "aten._unsafe_view.default",
               "aten.view.default", "aten.reshape.default", "aten.repeat_interleave.self_int")


def _cache_entry(graph: Graph, sdpa: Node) -> tuple[Node, int]:
    """Where to rotate attention's keys: where new keys enter a decode step's cache
    (``cat(past, new)``, reached through the head-sharing copies of grouped-query attention), so
    the cache holds rotated keys and is quantized after the rotation; else at attention itself."""
    value = sdpa.operand(1)
    while value.producer is not None and value.producer.op in _SHAPE_ONLY:
        value = value.producer.operands[0]
    join = value.producer
    inputs = {id(v) for v in graph.inputs}
    if join is not None and join.op == "aten.cat.default" and len(join.operands) == 2 \
            and id(join.operands[0]) in inputs and len(value.users) == len({id(u) for u in value.users}):
        return join, 1
    return sdpa, 1
