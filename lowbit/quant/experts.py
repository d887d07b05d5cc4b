"""Mixture-of-experts weights: the experts of a transformers MoE layer run as grouped matmuls
``grouped_mm(x, W, offsets)``: x [rows, in] holds each routed (token, expert) pair's input,
sorted by expert, W [experts, in, out] every expert's weight, and offsets[e] the end of expert
e's rows. Each expert's matrix W[e]ᵀ [out, in] is a linear layer's weight, quantized as one:
per output channel or per group of inputs, by rounding to nearest or by GPTQ on the Hessian of
the rows routed to it.

Codes and scales are stored in W's own layout, so the graph keeps computing with
``dequantize(codes, scale, zero point)`` [experts, in, out] in place of W: groups (and a
channel's single scale, as one group spanning the inputs) run along dim 1, scales are
[experts, groups, out].

An expert the calibration routes few rows to has a Hessian of low rank (none: zero), on which
GPTQ would fit noise (or zero the weights of inputs it never saw). Each expert's Hessian is
therefore taken as its own rows' plus ``in`` rows' worth of the layer's pooled statistics
(all experts' rows): a prior that dominates while the expert saw fewer rows than it has
inputs and fades once it saw many.

    nodes = expert_matmuls(graph)
    rounded = round_experts(w, spec)                        # round to nearest
    rounded, seen = gptq_experts(w, spec, lambda: zip(sweep.values(x), sweep.values(offsets)))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lowbit.ir.graph import Graph, Node
from lowbit.quant.checkpoint import Rounded
from lowbit.quant.gptq import gptq_quantize
from lowbit.quant.spec import QSpec
from lowbit.quant.weights import apply_qparams, weight_qparams

GROUPED_MM = ("ops.transformers.grouped_mm_fallback.default",)
HESSIAN_BYTES = 1 << 30  # experts' Hessians held at once (float64), at most


def expert_matmuls(graph: Graph) -> list[Node]:
    """The grouped matmuls whose weight is a constant float [experts, in, out] tensor."""
    return [node for node in graph.nodes if is_expert_matmul(graph, node)]


def is_expert_matmul(graph: Graph, node: Node) -> bool:
    """``node`` is a grouped matmul whose weight is a constant float [experts, in, out] tensor."""
    if node.op not in GROUPED_MM or len(node.operands) < 3 or not graph.is_constant(node.operands[1]):
        return False
    t = node.operand(1).tensor_type
    return t.rank == 3 and t.dtype.is_float and t.is_static


def where(nodes: list[Node]) -> str:
    """The MoE layers of ``nodes`` for a note: the first and the last module path."""
    paths = list(dict.fromkeys(n.loc.module or n.results[0].name for n in nodes))
    return paths[0] if len(paths) == 1 else f"{paths[0]} … {paths[-1]}"


def expert_spec(spec: QSpec, in_features: int) -> QSpec:
    """A group as wide as the inputs or wider is one scale per output channel."""
    if spec.granularity == "group" and spec.group_size >= in_features:
        return QSpec(spec.dtype, "channel", None, spec.symmetric, observer=spec.observer)
    return spec


def round_experts(w: torch.Tensor, spec: QSpec, hessians: Iterable[torch.Tensor] | None = None, *,
                  damp: float = 0.01, act_order: bool = False, refit: bool = True) -> Rounded:
    """Codes, scales and zero points of every expert of ``w`` [experts, in, out], in that
    layout (``dequantize`` attrs: axis 1, groups of ``spec``'s size, or of ``in`` per channel
    or tensor). With ``hessians`` (one [in, in] per expert, in order) by GPTQ, else to nearest."""
    experts, cin, cout = w.shape
    spec = expert_spec(spec, cin)
    group = spec.group_size if spec.granularity == "group" else cin
    hs = iter(hessians) if hessians is not None else None
    codes = torch.empty(w.shape, dtype=spec.dtype.storage)
    scales = torch.empty(experts, -(-cin // group), cout)
    zeros = None if spec.symmetric else torch.empty(experts, -(-cin // group), cout, dtype=spec.dtype.storage)
    for e in range(experts):
        rows = w[e].T.float()  # [out, in]
        if hs is None:
            scale, zp, attrs = weight_qparams(rows, spec)
            q = apply_qparams(rows, scale, zp, spec, attrs)
        else:
            q, scale, zp, attrs = gptq_quantize(rows, next(hs), spec, damp, act_order, refit=refit)
        codes[e] = q.T
        scales[e] = _as_groups(scale, cout)
        if zeros is not None:
            zeros[e] = _as_groups(zp, cout)
    return Rounded(codes, scales, zeros, {"axis": 1, "group_size": group})


def _as_groups(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A 2-D weight's scale (or zero point) as [groups, out]: [out, groups] per group, [out]
    per channel, one value per tensor."""
    if t.dim() == 2:
        return t.T
    return t.reshape(1, -1).expand(1, rows)


def gptq_experts(w: torch.Tensor, spec: QSpec, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                 *, damp: float = 0.01, act_order: bool = False, refit: bool = True) -> tuple[Rounded, torch.Tensor]:
    """GPTQ on every expert of ``w`` [experts, in, out]: ``batches()`` yields each calibration
    batch's (rows [rows, in] sorted by expert, offsets [experts]); it is read once for the pooled
    Hessian and once per chunk of experts whose Hessians fit in ``HESSIAN_BYTES``. Returns the
    rounding (as ``round_experts``) and the rows each expert saw."""
    experts, cin, _ = w.shape
    pooled, rows = torch.zeros(cin, cin, dtype=torch.float64), 0
    for x, offs in batches():
        routed = x.detach().reshape(-1, cin)[: int(offs.reshape(-1)[-1])].double()
        pooled.add_(routed.T @ routed)
        rows += routed.shape[0]
    prior = pooled.mul_(cin / max(rows, 1))  # ``in`` rows' worth of the pooled statistics
    chunk = max(1, min(experts, HESSIAN_BYTES // (8 * cin * cin)))
    parts, seen = [], []
    for first in range(0, experts, chunk):
        hs, got = _expert_hessians(batches(), first, min(chunk, experts - first), cin)
        parts.append(round_experts(w[first:first + chunk], spec, (h.add_(prior).float() for h in hs),
                                   damp=damp, act_order=act_order, refit=refit))
        seen.append(got)
        del hs
    zeros = None if parts[0].zp is None else torch.cat([p.zp for p in parts])
    return Rounded(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zeros,
                   parts[0].attrs), torch.cat(seen)


def _expert_hessians(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], first: int, count: int,
                     width: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Σ xᵀx (float64) over the rows routed to each of experts ``first`` … ``first + count − 1``,
    and how many rows each got."""
    hs = [torch.zeros(width, width, dtype=torch.float64) for _ in range(count)]
    seen = torch.zeros(count, dtype=torch.long)
    for x, offs in batches:
        x = x.detach().reshape(-1, width)
        ends = [0, *(int(o) for o in offs.reshape(-1).tolist())]
        for i in range(count):
            part = x[ends[first + i]:ends[first + i + 1]].double()
            hs[i].add_(part.T @ part)
            seen[i] += part.shape[0]
    return hs, seen


class RoutedRows:
    """One grouped matmul's calibration input, kept by the expert each row was routed to: every
    expert's channel max |x| over all its rows, and a sample of rows (every k-th routed row of
    a batch, so that each expert keeps its share of the traffic), ``max_rows`` in all. It is fed
    each batch's rows and offsets by ``watch_routed``, in whichever order the graph makes them."""

    def __init__(self, experts: int, max_rows: int = 2048, per_batch: int = 256) -> None:
        self.experts, self.max_rows, self.per_batch = experts, max_rows, per_batch
        self.absmax: torch.Tensor | None = None  # [experts, in]
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(experts)]
        self.count = 0
        self._pending: dict[str, torch.Tensor] = {}

    def feed(self, kind: str, t: torch.Tensor) -> None:
        self._pending[kind] = t
        if len(self._pending) == 2:
            self._add(self._pending.pop("rows"), self._pending.pop("offsets"))

    def _add(self, x: torch.Tensor, offsets: torch.Tensor) -> None:
        counts = torch.diff(offsets.reshape(-1).long(), prepend=torch.zeros(1, dtype=torch.long))
        x = x.detach().reshape(-1, x.shape[-1])[: int(counts.sum())].float()
        expert = torch.repeat_interleave(torch.arange(self.experts), counts)
        amax = torch.zeros(self.experts, x.shape[1]).scatter_reduce(
            0, expert[:, None].expand_as(x), x.abs(), "amax", include_self=True)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        take = min(self.per_batch, self.max_rows - self.count)
        if take <= 0 or not x.shape[0]:
            return
        idx = torch.arange(0, x.shape[0], max(1, x.shape[0] // self.per_batch))[:take]
        for e in expert[idx].unique().tolist():
            self.parts[e].append(x[idx[expert[idx] == e]].clone())
        self.count += idx.numel()

    def rows(self, e: int) -> torch.Tensor:
        """Expert ``e``'s sampled rows [rows, in] (none: zero rows)."""
        parts = self.parts[e]
        return torch.cat(parts) if parts else torch.zeros(0, 0 if self.absmax is None else self.absmax.shape[1])


class _Watch:
    """A calibration observer that hands each tensor to several readers."""

    def __init__(self, value) -> None:
        self.value = value
        self.readers: list[Callable[[torch.Tensor], None]] = []

    def update(self, x: torch.Tensor) -> None:
        for read in self.readers:
            read(x)


def watch(observers: dict, value, read: Callable[[torch.Tensor], None]) -> None:
    """Have ``calibrate(graph, batches, watched(observers), observers=observers)`` hand ``value``'s
    tensor of each batch to ``read``."""
    observers.setdefault(value.name, _Watch(value)).readers.append(read)


def watched(observers: dict) -> list:
    """The values ``watch`` was asked to observe."""
    return [w.value for w in observers.values()]


def watch_routed(observers: dict, node: Node, max_rows: int = 2048) -> RoutedRows:
    """The rows routed to each expert of grouped matmul ``node``, gathered by ``calibrate``
    (``observers``, with ``node.operands[0]`` and ``[2]`` among its values)."""
    routed = RoutedRows(node.operand(1).tensor_type.shape[0], max_rows)
    watch(observers, node.operand(0), lambda t: routed.feed("rows", t))
    watch(observers, node.operand(2), lambda t: routed.feed("offsets", t))
    return routed
