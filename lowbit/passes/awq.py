"""``awq``: activation-aware weight quantization (lossy; run before ``insert-qdq`` with the
same weight spec, which then rounds the prepared weights to nearest).

1. Scale search, per scale-folding region (see ``smooth``): with s_x = mean|X| per input
   channel, try s = s_x^α (α on a grid in [0, 1], normalized by √(max·min)) and keep the s
   minimizing ‖Q(W·diag(s))·(diag(s)⁻¹·X) − W·X‖² over a calibration sample, then fold s
   (lossless: X·diag(s)⁻¹ into the producer, diag(s)·W into the consumers).
2. Clip search, per linear: for each output row and weight group, the ratio r ∈ [0.5, 1]
   of the group's range minimizing ‖(W − Q_r(W))·X‖²; the weights are clipped to it, so the
   following round-to-nearest uses the clipped range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.ir.graph import Graph, Node
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.smooth import Region, apply_scales, find_regions
from lowbit.quant.calibrate import RowSample, calibrate
from lowbit.quant.experts import expert_matmuls, where
from lowbit.quant.spec import QSpec, parse_qspec
from lowbit.quant.weights import fake_quantize, group_view


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], spec: QSpec, grid: int) -> torch.Tensor:
    """The per-channel scale minimizing the consumers' quantized output error on sample x."""
    sx = x.abs().mean(0).clamp_min(1e-6)
    ref = [x @ w.T for w in weights]
    best, best_err = torch.ones_like(sx), float("inf")
    for i in range(grid + 1):
        s = sx ** (i / grid)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(((x / s) @ fake_quantize(w * s, spec).T - r).pow(2).sum().item()
                  for w, r in zip(weights, ref))
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

    def __post_init__(self) -> None:
        spec = parse_qspec(self.weights, f"{self.name}.weights")
        if spec.granularity not in ("channel", "group"):
            raise ValueError(f"{self.name}.weights: AWQ needs channel or group granularity, got {spec}")

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        spec = parse_qspec(self.weights, f"{self.name}.weights")
        batches = ctx.require_calibration(self.name)
        regions = find_regions(graph)
        experts = expert_matmuls(graph)
        if experts:
            ctx.note(f"{self.name}: {len(experts)} MoE expert weight tensor(s) ({where(experts)}) "
                     "get no AWQ scales or clipping (they read a routed copy of their input); insert-qdq rounds "
                     "them with its own spec")
        samples = self._sample(graph, batches, [r.x for r in regions], ctx)
        for r in regions:
            weights = [graph.tensor(u.operand(1)).float() for u in r.consumers]
            apply_scales(graph, r, search_scale(samples[r.x.name], weights, spec, self.grid), self.name)
        if self.clip:
            linears = [n for n in graph.nodes if n.op == "core.linear" and graph.is_constant(n.operands[1])]
            samples = self._sample(graph, batches, [n.operand(0) for n in linears], ctx)
            for n in linears:
                self._clip(graph, n, samples[n.operand(0).name], spec)
        return bool(regions) or self.clip

    def _sample(self, graph: Graph, batches, values, ctx: PassContext) -> dict[str, torch.Tensor]:
        unique = list({id(v): v for v in values}.values())
        stats = calibrate(graph, batches, unique, progress=ctx.progress, desc=self.name,
                          observer=lambda: RowSample(self.rows))
        return {name: st.tensor() for name, st in stats.items()}

    def _clip(self, graph: Graph, node: Node, x: torch.Tensor, spec: QSpec) -> None:
        w = node.operand(1)
        tensor = graph.tensor(w)
        graph.set_tensor(w, search_clip(tensor.float(), x, spec).to(tensor.dtype))
        node.touch(self.name)


__all__ = ["Awq", "Region", "search_clip", "search_scale"]
