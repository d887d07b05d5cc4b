"""What the report keeps of the graph after each pass, and how two of them differ.

A ``Snapshot`` holds, per node, its printed line (op, operands, attributes, type, module; a
constant's line carries its content hash), so

  added   = nodes whose result name is new,
  removed = names that are gone,
  changed = names whose printed line differs (a folded weight's hash, a rewired operand).

It also holds the pass's quantization table (each quantized tensor: dtype, granularity, scale
range, share of values clipped and relative error, measured on the sample inputs for
activations and against the float weight for weights) and, per constant, a fingerprint from
which the report says which weights a folding or rotation pass moved and by how much.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from lowbit.ir.dialects.quant import dequantize, dynamic_quantize, expand_scale, quantize
from lowbit.ir.graph import Graph, Node, tensor_digest
from lowbit.ir.interpreter import capture_values
from lowbit.ir.printer import format_node
from lowbit.ir.types import DType

QUANT_LINEARS = ("quant.linear", "quant.dynamic_linear", "quant.static_linear")


@dataclass(frozen=True)
class NodeView:
    name: str
    op: str
    line: str
    module: str
    operands: tuple[str, ...]


@dataclass
class Snapshot:
    index: int
    pass_name: str
    nodes: dict[str, NodeView]
    constants: dict[str, tuple[str, torch.Tensor]]  # constant name → (hash, tensor)

    def histogram(self) -> Counter:
        return Counter(v.op for v in self.nodes.values())


@dataclass(frozen=True)
class Diff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]


class Digests:
    """Content hashes of constants, computed once per tensor (and version) across all passes:
    most passes leave most weights as they are."""

    def __init__(self):
        self._known: dict[int, tuple[torch.Tensor, int, str]] = {}

    def __call__(self, t: torch.Tensor) -> str:
        hit = self._known.get(id(t))
        if hit is None or hit[0] is not t or hit[1] != t._version:
            hit = (t, t._version, tensor_digest(t))  # the tensor is held, so its id stays its own
            self._known[id(t)] = hit
        return hit[2]


def take(graph: Graph, index: int, pass_name: str, digest=tensor_digest) -> Snapshot:
    nodes = {}
    for node in graph.nodes:
        nodes[node.results[0].name] = NodeView(node.results[0].name, node.op, format_node(node, graph, digest),
                                               node.loc.module or "",
                                               tuple(v.name if v else "none" for v in node.operands))
    constants = {name: (digest(t), t) for name, t in graph.tensors.items()}
    return Snapshot(index, pass_name, nodes, constants)


def diff(before: Snapshot, after: Snapshot) -> Diff:
    """Nodes ``after`` added, removed and changed relative to ``before`` (by result name)."""
    old, new = before.nodes, after.nodes
    return Diff(tuple(n for n in new if n not in old), tuple(n for n in old if n not in new),
                tuple(n for n in new if n in old and old[n].line != new[n].line))


def moved_constants(before: Snapshot, after: Snapshot, graph_users: dict[str, str]) -> list[dict]:
    """Constants whose values a pass changed: name, module of the reader, shape, relative change."""
    rows = []
    for name, (digest, t) in after.constants.items():
        prev = before.constants.get(name)
        if prev is None or prev[0] == digest:
            continue
        old = prev[1]
        same = old.shape == t.shape and old.is_floating_point() and t.is_floating_point()
        change = ((t.double() - old.double()).norm() / old.double().norm().clamp_min(1e-30)).item() if same else None
        rows.append({"constant": name, "module": graph_users.get(name, ""), "shape": "×".join(map(str, t.shape)),
                     "relative change": change})
    return rows


def constant_readers(graph: Graph) -> dict[str, str]:
    """Constant name → module path of its first reader."""
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "core.constant" and node.result.users:
            out[str(node.attrs["name"])] = node.result.users[0].loc.module or ""
    return out


# ---- quantization table -------------------------------------------------------------------

def _granularity(attrs: dict, dynamic: bool = False) -> str:
    if dynamic:
        return "token"
    if attrs.get("group_size") is not None:
        return f"group {attrs['group_size']}"
    return "tensor" if attrs.get("axis") is None else "channel"


def _stats(x: torch.Tensor, xq: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, float]:
    x, xq = x.double(), xq.double()
    clipped = ((x < lo.double()) | (x > hi.double())).double().mean().item()
    return clipped, ((xq - x).norm() / x.norm().clamp_min(1e-30)).item()


def _range(dtype, scale, zero, x, attrs):
    """The float values the quantizer can represent, broadcast against ``x``."""
    s = expand_scale(scale, x, attrs.get("axis"), attrs.get("group_size")).double()
    if dtype.is_float:
        limit = torch.finfo(dtype.storage).max
        return -limit * s, limit * s
    qmin, qmax = dtype.int_range
    z = 0 if zero is None else expand_scale(zero, x, attrs.get("axis"), attrs.get("group_size")).double()
    return (qmin - z) * s, (qmax - z) * s


def quant_rows(graph: Graph, samples: list | None, float_weights: dict[str, torch.Tensor]) -> list[dict]:
    """One row per quantized tensor in ``graph``: weights (against ``float_weights``, keyed by
    the reading linear's module) and activations (on ``samples``)."""
    rows = [r for node in graph.nodes for r in _weight_rows(graph, node, float_weights)]
    targets = [n for n in graph.nodes if n.op in ("quant.quantize", "quant.dynamic_quantize")
               and not graph.is_constant(n.operand(0))]
    seen = capture_values(graph, samples, [n.operand(0) for n in targets]) if samples is not None and targets else {}
    for node in targets:
        rows.append(_activation_row(graph, node, seen.get(id(node.operand(0)))))
    return rows


def _weight_rows(graph: Graph, node: Node, float_weights: dict[str, torch.Tensor]) -> list[dict]:
    if node.op == "quant.dequantize" and graph.is_constant(node.operand(0)) and node.result.users:
        readers = node.result.users
        q, scale, zero = (None if v is None else graph.tensors[str(v.producer.attrs["name"])] for v in node.operands)
        dtype, module = node.operand(0).type.dtype, readers[0].loc.module or ""
    elif node.op in QUANT_LINEARS:
        i = 3 if node.op == "quant.static_linear" else 1
        vals = node.operands[i:i + 3]
        if not graph.is_constant(vals[0]):
            return []
        q, scale, zero = (None if v is None else graph.tensors[str(v.producer.attrs["name"])] for v in vals)
        dtype, module = vals[0].type.dtype, node.loc.module or ""
    else:
        return []
    w = dequantize(q, scale, zero, axis=node.attrs.get("axis"), group_size=node.attrs.get("group_size"),
                   out_dtype=DType.f32)
    ref = float_weights.get(module)
    clipped = err = None
    if ref is not None and ref.shape == w.shape:
        lo, hi = _range(dtype, scale, zero, ref, node.attrs)
        clipped, err = _stats(ref, w, lo, hi)
    return [{"tensor": f"{module or node.results[0].name} weight", "kind": "weight", "dtype": dtype.short,
             "granularity": _granularity(node.attrs), "scale min": scale.float().min().item(),
             "scale max": scale.float().max().item(), "clipped": clipped, "rel error": err}]


def _activation_row(graph: Graph, node: Node, x: torch.Tensor | None) -> dict:
    dynamic = node.op == "quant.dynamic_quantize"
    dtype = node.attrs["dtype"]
    row = {"tensor": f"%{node.operand(0).name}", "kind": "activation", "dtype": dtype.short,
           "granularity": _granularity(node.attrs, dynamic), "scale min": None, "scale max": None,
           "clipped": None, "rel error": None}
    if x is None:
        return row
    x = x.float()
    if dynamic:
        clip = node.attrs.get("clip", 1.0)  # a token's values beyond clip × its range saturate
        q, scale, zero = dynamic_quantize(x, dtype=dtype, symmetric=node.attrs.get("symmetric", True), clip=clip)
        xq = (q.float() - zero.float()) * scale
        lo, hi = x.amin(-1, keepdim=True).clamp_max(0) * clip, x.amax(-1, keepdim=True).clamp_min(0) * clip
        clipped = ((x < lo) | (x > hi)).float().mean().item()
        row.update({"scale min": scale.min().item(), "scale max": scale.max().item(), "clipped": clipped,
                    "rel error": ((xq - x).double().norm() / x.double().norm().clamp_min(1e-30)).item()})
        return row
    scale, zero = (None if v is None else graph.tensors[str(v.producer.attrs["name"])] for v in node.operands[1:3])
    attrs = {"axis": node.attrs.get("axis"), "group_size": node.attrs.get("group_size")}
    xq = dequantize(quantize(x, scale, zero, dtype=dtype, **attrs), scale, zero, out_dtype=DType.f32, **attrs)
    lo, hi = _range(dtype, scale, zero, x, attrs)
    clipped, err = _stats(x, xq, lo, hi)
    row.update({"scale min": scale.float().min().item(), "scale max": scale.float().max().item(),
                "clipped": clipped, "rel error": err})
    return row


def float_weights_of(graph: Graph) -> dict[str, torch.Tensor]:
    """Module path → float weight of each linear whose weight is a float constant."""
    out = {}
    for node in graph.nodes:
        if node.op == "core.linear" and graph.is_constant(node.operand(1)):
            t = graph.tensors[str(node.operand(1).producer.attrs["name"])]
            if t.is_floating_point() and node.loc.module:
                out[node.loc.module] = t
    return out
