"""Function-preserving reparameterizations that make activations or weights easier to quantize.

``repq-reparam`` (RepQ-ViT): a post-LayerNorm activation X has very different ranges per
channel. Calibrate each channel's [lo_c, hi_c]; pick the per-tensor target [lo_t, hi_t] (the
channel means) and per channel r_c = (hi_c − lo_c) / (hi_t − lo_t), δ_c = lo_c − r_c·lo_t, so
that X̃ = (X − δ)/r has the same range in every channel. Then
    γ' = γ / r,  β' = (β − δ) / r              (the norm's affine now produces X̃)
    W' = W·diag(r),  b' = b + W·δ               (every consumer linear undoes it)
and one per-tensor quantizer fits X̃. Needs every consumer of X to be a linear.

``equalize-cross-layer`` (conv → ReLU → conv): ReLU(x/s) = ReLU(x)/s for s > 0, so with
r1_i = max|W1[i]| and r2_i = max|W2[:, i]|, s_i = √(r1_i / r2_i):
    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i
which equalizes the two layers' per-channel ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.ir.graph import Graph, Node
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.rewriter import single_user
from lowbit.passes.smooth import _own_constant, find_regions
from lowbit.quant.calibrate import calibrate
from lowbit.quant.observers import TensorStats


class _ChannelRange(TensorStats):
    """Per-channel min and max over the last dim (besides TensorStats' own statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().float().reshape(-1, x.shape[-1])
        lo, hi = x2.amin(0), x2.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


@register
@dataclass(frozen=True)
class RepqReparam(Pass):
    name: ClassVar[str] = "repq-reparam"
    idempotent: ClassVar[bool] = False
    summary: ClassVar[str] = "RepQ-ViT: fold per-channel LayerNorm-output ranges into the norm and next linears"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        regions = [r for r in find_regions(graph) if r.producer.op == "core.layer_norm"
                   and r.x.producer is r.producer]
        if not regions:
            return False
        stats = calibrate(graph, ctx.require_calibration(self.name), [r.x for r in regions],
                          progress=ctx.progress, desc=self.name, observer=_ChannelRange)
        for r in regions:
            self._fold(graph, r.producer, r.consumers, stats[r.x.name])
        return True

    def _fold(self, graph: Graph, norm: Node, consumers: list[Node], st: _ChannelRange) -> None:
        lo_c, hi_c = st.lo.clamp_max(0), st.hi.clamp_min(0)
        width = (hi_c - lo_c).clamp_min(1e-6)
        lo_t, width_t = lo_c.mean(), width.mean()
        r = width / width_t
        delta = lo_c - r * lo_t
        gamma = norm.operand(1)
        graph.set_tensor(gamma, graph.tensor(gamma) / r)
        if norm.operands[2] is None:
            norm.set_operand(2, graph.constant(-delta / r, f"{gamma.producer.attrs['name']}.repq_bias", norm.loc.copy()))
        else:
            graph.set_tensor(norm.operand(2), (graph.tensor(norm.operand(2)) - delta) / r)
        norm.touch(self.name)
        for u in consumers:
            w = graph.tensor(u.operand(1))
            shift = w @ delta
            graph.set_tensor(u.operand(1), w * r)
            if u.operands[2] is None:
                u.set_operand(2, graph.constant(shift, f"{u.operand(1).producer.attrs['name']}.repq_bias", u.loc.copy()))
            else:
                graph.set_tensor(u.operand(2), graph.tensor(u.operand(2)) + shift)
            u.touch(self.name)


def _conv_relu_conv(graph: Graph) -> list[tuple[Node, Node]]:
    pairs = []
    for relu in graph.nodes:
        if relu.op != "core.relu":
            continue
        first, act = relu.operand(0).producer, relu.result
        second = single_user(act, graph)
        if (first is None or first.op != "core.conv2d" or second is None or second.op != "core.conv2d"
                or single_user(relu.operand(0), graph) is not relu or second.operands[0] is not act):
            continue
        if first.attrs.get("groups", 1) != 1 or second.attrs.get("groups", 1) != 1:
            continue
        if _own_constant(first.operands[1], graph) and _own_constant(second.operands[1], graph):
            if first.operands[2] is None or _own_constant(first.operands[2], graph):
                pairs.append((first, second))
    return pairs


@register
@dataclass(frozen=True)
class EqualizeCrossLayer(Pass):
    name: ClassVar[str] = "equalize-cross-layer"
    summary: ClassVar[str] = "equalize per-channel weight ranges across conv → relu → conv"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        pairs = _conv_relu_conv(graph)
        changed = False
        for first, second in pairs:
            w1, w2 = graph.tensor(first.operand(1)), graph.tensor(second.operand(1))
            r1 = w1.abs().flatten(1).amax(1)
            r2 = w2.abs().transpose(0, 1).flatten(1).amax(1)
            s = torch.sqrt(r1.clamp_min(1e-8) / r2.clamp_min(1e-8))
            if torch.allclose(s, torch.ones_like(s), atol=1e-3):
                continue  # already equalized
            graph.set_tensor(first.operand(1), w1 / s.reshape(-1, 1, 1, 1))
            if first.operands[2] is not None:
                graph.set_tensor(first.operand(2), graph.tensor(first.operand(2)) / s)
            graph.set_tensor(second.operand(1), w2 * s.reshape(1, -1, 1, 1))
            first.touch(self.name), second.touch(self.name)
            changed = True
        return changed
