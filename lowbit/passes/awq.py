"""``awq``: activation-aware weight quantization (lossy; run before ``insert-qdq`` with the
same weight spec, which then rounds the prepared weights to nearest).

1. Scale search, per scale-folding region (see ``smooth``): with s_x = mean|X| per input
   channel, try s = s_x^α (α on a grid in [0, 1], normalized by √(max·min)) and keep the s
   minimizing ‖Q(W·diag(s))·(diag(s)⁻¹·X) − W·X‖² over a calibration sample, then fold s
   (lossless: X·diag(s)⁻¹ into the producer, diag(s)·W into the consumers).
2. Clip search, per linear: for each output row and weight group, the ratio r ∈ [0.5, 1]
   of the group's range minimizing ‖(W − Q_r(W))·X‖²; the weights are clipped to it, so the
   following round-to-nearest uses the clipped range.

MoE experts (``experts``, on by default) take part as ``smooth`` describes: a norm's scale is
searched on the error of the router, the other linears and every expert on the rows routed to
it; after the up projection each expert's own scale is searched on its own rows, and each
expert's weights are clipped on them. An expert no sampled calibration row reached keeps
its own scale at 1 and its full range, and a note counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from lowbit.ir.graph import Graph, Node
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.smooth import (Region, apply_scales, expert_matrices, expert_terms, find_regions,
                                  note_unscaled, sample_inputs)
from lowbit.quant.calibrate import RowSample
from lowbit.quant.experts import GROUPED_MM, RoutedRows, expert_matmuls, expert_spec
from lowbit.quant.spec import QSpec, parse_qspec
from lowbit.quant.weights import fake_quantize, group_view


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], spec: QSpec, grid: int,
                 extra: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor:
    """The per-channel scale minimizing the consumers' quantized output error on sample x;
    ``extra`` are (rows, weight) pairs read on their own rows (MoE experts on the rows routed
    to them)."""
    sx = x.abs().mean(0).clamp_min(1e-6)
    terms = [(x, w) for w in weights] + list(extra)
    ref = [xt @ w.T for xt, w in terms]
    best, best_err = torch.ones_like(sx), float("inf")
    for i in range(grid + 1):
        s = sx ** (i / grid)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(((xt / s) @ fake_quantize(w * s, spec).T - r).pow(2).sum().item()
                  for (xt, w), r in zip(terms, ref))
        if err < best_err:
            best, best_err = s, err
    return best


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QSpec, steps: int = 11) -> torch.Tensor:
    """Clipped weights: per row and group, the range ratio with the least output error (a short
    last group, where the group does not divide the in features, is searched on its own)."""
    rows, cols = w.shape
    group = spec.group_size if spec.granularity == "group" else cols
    groups = -(-cols // group)
    pad = groups * group - cols
    xg = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], groups, group)
    best_err = torch.full((rows, groups), float("inf"))
    best_ratio = torch.ones(rows, groups)
    for r in torch.linspace(1.0, 0.5, steps).tolist():
        clip = torch.full((rows, groups) if spec.granularity == "group" else (rows,), r)
        e = torch.nn.functional.pad(w - fake_quantize(w, spec, clip), (0, pad)).reshape(rows, groups, group)
        err = torch.einsum("ogk,ngk->ogn", e, xg).pow(2).sum(-1)  # [rows, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.tensor(r), best_ratio)
    view = group_view(w, group)
    lo = (view.amin(-1).clamp_max(0) * best_ratio).repeat_interleave(group, 1)[:, :cols]
    hi = (view.amax(-1).clamp_min(0) * best_ratio).repeat_interleave(group, 1)[:, :cols]
    return torch.maximum(torch.minimum(w, hi), lo)


@register
@dataclass(frozen=True)
class Awq(Pass):
    name: ClassVar[str] = "awq"
    lossless: ClassVar[bool] = False  # the clipping changes the weights
    idempotent: ClassVar[bool] = False
    summary: ClassVar[str] = "activation-aware scale search and weight clipping (before insert-qdq)"
    weights: str = "int4/group128/asym"
    grid: int = 20
    clip: bool = True
    rows: int = 512  # calibration tokens sampled per searched activation
    experts: bool = True  # scale and clip MoE experts too, each on the rows routed to it

    def __post_init__(self) -> None:
        spec = parse_qspec(self.weights, f"{self.name}.weights")
        if spec.granularity not in ("channel", "group"):
            raise ValueError(f"{self.name}.weights: AWQ needs channel or group granularity, got {spec}")

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        spec = parse_qspec(self.weights, f"{self.name}.weights")
        batches = ctx.require_calibration(self.name)
        regions = find_regions(graph, experts=self.experts)
        note_unscaled(graph, regions, ctx, self.name, self.experts)
        xs, routed = self._sample(graph, batches, [r.x for r in regions if not r.routed],
                                  [u for r in regions for u in r.consumers if u.op in GROUPED_MM], ctx)
        unreached = set()
        for r in tqdm(regions, desc=f"{self.name} scales", unit="region", disable=not ctx.progress, leave=False):
            if r.routed:  # each expert's own scale, searched on the rows routed to it
                down = r.consumers[0]
                w = expert_matrices(graph, down)  # [experts, out, in]
                s = torch.ones(w.shape[0], w.shape[2])
                for e in range(w.shape[0]):
                    if (rows := routed[id(down)].rows(e)).shape[0]:
                        s[e] = search_scale(rows, [w[e]], spec, self.grid)
                    else:
                        unreached.add((id(down), e))
                apply_scales(graph, r, s, self.name)
                continue
            weights = [graph.tensor(u.operand(1)).float() for u in r.consumers if u.op not in GROUPED_MM]
            apply_scales(graph, r, search_scale(xs[r.x.name].tensor(), weights, spec, self.grid,
                                                expert_terms(graph, r, routed)), self.name)
        if self.clip:
            linears = [n for n in graph.nodes if n.op == "core.linear" and graph.is_constant(n.operands[1])]
            experts = expert_matmuls(graph) if self.experts else []
            xs, routed = self._sample(graph, batches, [n.operand(0) for n in linears], experts, ctx)
            for n in tqdm(linears + experts, desc=f"{self.name} clipping", unit="layer", disable=not ctx.progress,
                          leave=False):
                if n.op in GROUPED_MM:
                    unreached |= self._clip_experts(graph, n, routed[id(n)], spec)
                else:
                    self._clip(graph, n, xs[n.operand(0).name].tensor(), spec)
        if unreached:
            ctx.note(f"{self.name}: {len(unreached)} MoE expert weight matrices saw no sampled calibration row: no "
                     "scale or clipping was searched on their own rows (more calibration text reaches more experts)")
        return bool(regions) or self.clip

    def _sample(self, graph: Graph, batches, values, experts, ctx: PassContext) -> tuple[dict, dict]:
        return sample_inputs(graph, batches, values, experts, lambda: RowSample(self.rows), 4 * self.rows,
                             ctx, self.name)

    def _clip(self, graph: Graph, node: Node, x: torch.Tensor, spec: QSpec) -> None:
        w = node.operand(1)
        tensor = graph.tensor(w)
        graph.set_tensor(w, search_clip(tensor.float(), x, spec).to(tensor.dtype))
        node.touch(self.name)

    def _clip_experts(self, graph: Graph, node: Node, routed: RoutedRows, spec: QSpec) -> set:
        """Each expert's weights clipped on the rows routed to it; the (node, expert) pairs
        that no sampled row reached."""
        w = node.operand(1)
        dtype = graph.tensor(w).dtype
        clipped = expert_matrices(graph, node)  # [experts, out, in]
        spec = expert_spec(spec, clipped.shape[2])
        unreached = set()
        for e in range(clipped.shape[0]):
            if (rows := routed.rows(e)).shape[0]:
                clipped[e] = search_clip(clipped[e], rows, spec)
            else:
                unreached.add((id(node), e))
        graph.set_tensor(w, clipped.transpose(1, 2).contiguous().to(dtype))
        node.touch(self.name)
        return unreached


__all__ = ["Awq", "Region", "search_clip", "search_scale"]
