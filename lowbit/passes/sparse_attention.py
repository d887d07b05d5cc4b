"""sparse-attention: training-free block-sparse attention.

Every ``core.sdpa`` becomes

    block_mask = attn.block_mask(q, k, mask){method, block, ...}
    out        = attn.block_sparse_sdpa(q, k, v, block_mask, mask){block}

(see ``lowbit/ir/dialects/attn.py`` for how blocks are chosen: pooled q·k block scores, sink
blocks and a local window always kept, then top-k, a target sparsity, or a cumulative mass).
The model's own mask (padding, causality) is kept and applied on top, so the pass is right for
any mask; ``causal=true`` instead drops a decoder's mask and attends causally, which is what
the Triton kernel takes (only for inputs without padding).

Lossy: ``attention_quality`` measures, per layer, the relative output error against dense
attention, the softmax mass the kept blocks hold, and the block sparsity reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.errors import LowbitError
from lowbit.ir.dialects.attn import METHODS, allowed_blocks, repeat_heads, token_mask
from lowbit.ir.graph import Graph, Node
from lowbit.ir.interpreter import capture_values
from lowbit.passes.base import Pass, PassContext, register


@register
@dataclass(frozen=True)
class SparseAttention(Pass):
    name: ClassVar[str] = "sparse-attention"
    lossless: ClassVar[bool] = False
    summary: ClassVar[str] = "sdpa → block-sparse attention with blocks chosen from pooled q·k (training-free)"
    method: str = "mass"  # mass (adaptive) | sparsity (a target per head) | topk (per query block)
    block: int = 64
    sparsity: float = 0.5
    topk: int = 8
    mass: float = 0.95
    sinks: int = 1
    window: int = 2
    causal: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(f"sparse-attention: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.block < 1 or self.sinks < 0 or self.window < 1 or self.topk < 0:
            raise LowbitError("sparse-attention: block ≥ 1, sinks ≥ 0, window ≥ 1, topk ≥ 0")
        if not 0.0 <= self.sparsity < 1.0 or not 0.0 < self.mass <= 1.0:
            raise LowbitError("sparse-attention: 0 ≤ sparsity < 1 and 0 < mass ≤ 1")

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        nodes = [n for n in graph.nodes if n.op == "core.sdpa"]
        for node in nodes:
            self._rewrite(graph, node)
        if not nodes:
            ctx.note("sparse-attention: the graph has no scaled_dot_product_attention")
        return bool(nodes)

    def _rewrite(self, graph: Graph, node: Node) -> None:
        q, k, v = node.operands[:3]
        mask = None if self.causal else node.operands[3]
        causal = self.causal or bool(node.attrs.get("causal", False))
        scale = node.attrs.get("scale")
        opts = {"block": self.block, "method": self.method, "topk": self.topk, "sparsity": self.sparsity,
                "mass": self.mass, "sinks": self.sinks, "window": self.window, "causal": causal, "scale": scale}
        builder = graph.create_node("attn.block_mask", [q, k, mask], opts, None, node.loc.copy())
        graph.insert(builder, before=node)
        builder.touch(self.name)
        attn = graph.create_node("attn.block_sparse_sdpa", [q, k, v, builder.result, mask],
                                 {"block": self.block, "causal": causal, "scale": scale},
                                 [node.result.type], node.loc.copy())
        graph.insert(attn, before=node)
        attn.touch(self.name)
        graph.replace_value(node.result, attn.result)
        graph.erase(node)


def attention_quality(graph: Graph, inputs: list) -> list[dict]:
    """Per block-sparse attention: module path, block sparsity (share of the allowed blocks
    skipped), mass kept (mean over query rows of the dense softmax mass on kept keys) and the
    relative output error ‖o_sparse − o_dense‖ / ‖o_dense‖, on ``inputs``."""
    nodes = [n for n in graph.nodes if n.op == "attn.block_sparse_sdpa"]
    seen = capture_values(graph, inputs, [v for n in nodes for v in n.operands if v is not None])
    rows = []
    for node in nodes:
        q, k, v, bm, mask = (None if o is None else seen[id(o)] for o in node.operands)
        rows.append({"module": node.loc.module or node.result.name,
                     **_compare(q, k, v, bm, mask, node.attrs)})
    return rows


def _compare(q, k, v, block_mask, mask, attrs) -> dict:
    block, causal, scale = attrs.get("block", 64), attrs.get("causal", False), attrs.get("scale")
    lq, lk = q.shape[-2], k.shape[-2]
    k, v = repeat_heads(q, k), repeat_heads(q, v)
    s = q.float() @ k.float().transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    dense_mask = token_mask(torch.ones_like(block_mask), mask, block=block, causal=causal, lq=lq, lk=lk,
                               dtype=torch.float32)
    sparse_mask = token_mask(block_mask, mask, block=block, causal=causal, lq=lq, lk=lk, dtype=torch.float32)
    p = _masked(s, dense_mask).softmax(-1)
    o_dense, o_sparse = p @ v.float(), _masked(s, sparse_mask).softmax(-1).nan_to_num(0.0) @ v.float()
    kept = p * (_masked(torch.zeros_like(s), sparse_mask) == 0)
    allowed = allowed_blocks(mask, causal, lq, lk, block, q.device).expand_as(block_mask)
    return {"sparsity": 1 - (block_mask & allowed).sum().item() / allowed.sum().item(),
            "mass kept": kept.sum(-1).mean().item(),
            "rel err": ((o_sparse - o_dense).norm() / o_dense.norm()).item()}


def _masked(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if m.dtype == torch.bool:
        return s.masked_fill(~m, -torch.inf)
    return s + m
