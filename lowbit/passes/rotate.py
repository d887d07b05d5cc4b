"""Rotation passes (QuaRot style), all lossless.

``fuse-norms``: an RMSNorm's scale γ moves into the linears that read it, W' = W·diag(γ), and
the norm keeps no weight, so that RMSNorm(x·Q) = RMSNorm(x)·Q for any orthogonal Q.

``rotate-residual{seed}``: the residual stream (found from the graph: values joined by
residual adds and read by norms) is rotated by a randomized Hadamard Q = diag(±1)·H/√d
(a seeded random orthogonal Q where no Hadamard of size d is known): x' = x·Q. Then
    embedding rows  E' = E·Q        readers  W' = W·Q        writers  W' = Qᵀ·W,  b' = b·Q
and the logits are unchanged. A tied embedding/head weight gets E·Q once, which serves both.

``online-hadamard{where=down_proj}``: where a rotation cannot be folded (the FFN down
projection's input follows a nonlinearity), insert ``rotate.hadamard`` (x' = x·Hᵀ/√n) and fold
its inverse into the consumer, W' = W·Hᵀ/√n.

Preconditions are checked; a pass that cannot apply says why and leaves the graph as is.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import torch

from lowbit.ir.dialects.hadamard import factor, hadamard_transform
from lowbit.ir.graph import Graph, Node, Value
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.smooth import find_regions


@register
@dataclass(frozen=True)
class FuseNorms(Pass):
    name: ClassVar[str] = "fuse-norms"
    summary: ClassVar[str] = "fold RMSNorm scales into the linears that read them"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for r in find_regions(graph):
            norm = r.producer
            if norm.op != "core.rms_norm" or r.x.producer is not norm or norm.operands[1] is None:
                continue
            gamma = graph.tensor(norm.operand(1))
            for u in r.consumers:
                w = u.operand(1)
                graph.set_tensor(w, graph.tensor(w) * gamma.to(graph.tensor(w).dtype))
                u.touch(self.name)
            norm.set_operand(1, None)
            norm.touch(self.name)
            changed = True
        return changed


@dataclass
class ResidualStream:
    values: list[Value]          # the stream's values
    sources: list[Node]          # embeddings and linears writing into it
    norms: list[Node]            # norms reading it
    readers: list[Node]          # linears reading a norm's output


def find_residual_stream(graph: Graph) -> ResidualStream | str:
    """The residual stream, or why there is none that can be rotated."""
    g = nx.Graph()
    for node in graph.nodes:
        if node.op == "core.add" and all(v is not None and v.type == node.result.type for v in node.operands):
            for v in node.operands:
                g.add_edge(id(node.result), id(v))
    by_id = {id(v): v for n in graph.nodes for v in n.results}
    read_by_norm = {id(n.operand(0)) for n in graph.nodes if n.op == "core.rms_norm"}
    components = [c for c in nx.connected_components(g) if c & read_by_norm]
    if not components:
        return "no residual adds whose values are read by RMSNorm (only pre-RMSNorm models rotate)"
    stream = max(components, key=len)
    values = [by_id[i] for i in stream]
    outputs = {id(v) for v in graph.outputs}
    sources, norms = [], []
    for v in values:
        for u in v.users:
            if u.op == "core.rms_norm" and u.operand(0) is v:
                if u.operands[1] is not None:
                    return f"%{u.results[0].name} still has a scale: run fuse-norms first"
                norms.append(u)
            elif not (u.op == "core.add" and id(u.result) in stream):
                return f"%{v.name} is also read by {u.op} (%{u.results[0].name}); it cannot be rotated"
        if id(v) in outputs:
            return f"%{v.name} is a graph output; rotating it would change the output"
        p = v.producer
        if p is not None and p.op == "core.add" and id(p.result) in stream:
            continue
        if p is None or p.op not in ("core.embedding", "core.linear") or not _constant_weights(p, graph):
            return f"%{v.name} enters the stream from {p.op if p else 'a graph input'}, which cannot absorb Q"
        sources.append(p)
    readers = []
    for n in norms:
        for u in n.result.users:
            if u.op != "core.linear" or u.operands[0] is not n.result or not _constant_weights(u, graph):
                return f"the norm output %{n.result.name} is read by {u.op}, not only by linears"
            readers.append(u)
    return ResidualStream(values, sources, norms, readers)


def _constant_weights(node: Node, graph: Graph) -> bool:
    w = node.operands[0] if node.op == "core.embedding" else node.operands[1]
    bias = node.operands[2] if node.op == "core.linear" else None
    return graph.is_constant(w) and (bias is None or graph.is_constant(bias))


def randomized_hadamard(d: int, seed: int) -> torch.Tensor:
    """Q = diag(±1)·H/√d, or a random orthogonal matrix where no Hadamard of size d exists."""
    gen = torch.Generator().manual_seed(seed)
    try:
        factor(d)
        signs = torch.randint(0, 2, (d,), generator=gen).double() * 2 - 1
        return hadamard_transform(torch.diag(signs))  # rows: diag(s) · Hᵀ/√d
    except ValueError:
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))


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
        d = stream.values[0].tensor_type.shape[-1]
        q = randomized_hadamard(int(d), self.seed)
        done: set[int] = set()

        def transform(v: Value, fn) -> None:
            if id(v) in done:
                return  # a tied weight is rotated once
            done.add(id(v))
            t = graph.tensor(v)
            graph.set_tensor(v, fn(t.double()).to(t.dtype))

        for node in stream.sources:
            if node.op == "core.embedding":
                transform(node.operand(0), lambda e: e @ q)
            else:
                transform(node.operand(1), lambda w: q.T @ w)
                if node.operands[2] is not None:
                    transform(node.operand(2), lambda b: b @ q)
            node.touch(self.name)
        for node in stream.readers:
            transform(node.operand(1), lambda w: w @ q)
            node.touch(self.name)
        return True


@register
@dataclass(frozen=True)
class OnlineHadamard(Pass):
    name: ClassVar[str] = "online-hadamard"
    summary: ClassVar[str] = "insert rotate.hadamard before matching linears and fold its inverse into them"
    idempotent: ClassVar[bool] = False
    where: str = "*down_proj"  # module-path pattern of the linears whose input is rotated

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in list(graph.nodes):
            if node.op != "core.linear" or not fnmatch.fnmatchcase(node.loc.module, self.where):
                continue
            w = node.operands[1]
            if not graph.is_constant(w) or len(w.users) != 1:
                ctx.note(f"{self.name}: {node.loc.module} has no weight of its own to absorb the rotation")
                continue
            try:
                factor(int(w.tensor_type.shape[1]))
            except ValueError as e:
                ctx.note(f"{self.name}: {node.loc.module}: {e}")
                continue
            h = graph.append("rotate.hadamard", [node.operand(0)], loc=node.loc.copy(), before=node)
            h.touch(self.name)
            node.set_operand(0, h.result)
            t = graph.tensor(w)
            graph.set_tensor(w, hadamard_transform(t.double()).to(t.dtype))
            node.touch(self.name)
            changed = True
        return changed
