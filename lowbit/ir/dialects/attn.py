"""The ``attn`` dialect: block-sparse attention and its mask builder.

``attn.block_mask(q, k, mask?)`` chooses, per (batch, head, query block), which key blocks to
attend to — training-free, from the queries and keys themselves:

  q̄_i = mean of query block i,  k̄_j = mean of key block j,  S_ij = q̄_i·k̄_jᵀ·scale,
  P_i = softmax_j(S_ij) over the blocks the token mask (and ``causal``) allows,

then keeps the first ``sinks`` key blocks and the local window (the diagonal block and
``window`` − 1 blocks on each side; only before it when causal), and ranks the rest:
``method=topk`` keeps the ``topk`` best-scoring more per row; ``sparsity`` keeps ⌈(1 − sparsity)·n⌉
of a head's n allowed blocks (forced ones counted), spent across rows on the largest P_ij, so
rows whose attention is concentrated give blocks to rows where it is spread; ``mass`` keeps per
row the fewest blocks (forced ones first) whose estimated mass Σ P_ij reaches ``mass``. Grouped-query keys (fewer heads) are shared
by the query heads of their group.

``attn.block_sparse_sdpa(q, k, v, block_mask, mask?)`` attends only within the (query block,
key block) pairs that ``block_mask`` [batch, heads, ⌈Lq/block⌉, ⌈Lk/block⌉] keeps (and the
token mask allows); its reference is SDPA with the block mask expanded to tokens. Causal
attention aligns the last query with the last key. A query row must keep at least one key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit.errors import VerifyError
from lowbit.ir.attrs import AttrKind
from lowbit.ir.dialects.infer import tensor
from lowbit.ir.opdef import AttrDef, define
from lowbit.ir.types import DType, TensorType

METHODS = ("topk", "sparsity", "mass")


def expand_block_mask(block_mask: torch.Tensor, block: int, lq: int, lk: int) -> torch.Tensor:
    m = block_mask.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return m[..., :lq, :lk]


def repeat_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keys repeated to the query heads (grouped-query attention)."""
    if k.shape[1] == q.shape[1]:
        return k
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k.shape[1]} key heads")
    return k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of ``block`` tokens (the last block may be shorter)."""
    n = math.ceil(x.shape[-2] / block)
    pad = n * block - x.shape[-2]
    xs = F.pad(x.float(), (0, 0, 0, pad)).reshape(*x.shape[:-2], n, block, x.shape[-1])
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = block - pad
    return xs.sum(-2) / counts[:, None]


def causal_block_mask(nq: int, nk: int, block: int, lq: int, lk: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """bool [nQ, nK]: False where key block j lies wholly above the causal diagonal of query
    block i, i.e. its first key j·block > (last row of block i) + Lk − Lq."""
    last_row = (torch.arange(1, nq + 1, device=device) * block).clamp_max(lq) - 1
    first_key = torch.arange(nk, device=device) * block
    return first_key[None, :] <= last_row[:, None] + (lk - lq)


def allowed_blocks(mask: torch.Tensor | None, causal: bool, lq: int, lk: int, block: int,
             device: torch.device) -> torch.Tensor:
    """Block pairs with at least one token pair that the token mask and causality allow. Without
    a token mask, from the block numbers alone (no [Lq, Lk] tensor: at 64k tokens that is 4 GB)."""
    nq, nk = math.ceil(lq / block), math.ceil(lk / block)
    if mask is None:
        if not causal:
            return torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
        return causal_block_mask(nq, nk, block, lq, lk, device)[None, None]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if causal:
        allowed = allowed & torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
    allowed = allowed.expand(*allowed.shape[:2], lq, lk)
    padded = allowed.new_zeros(*allowed.shape[:2], nq * block, nk * block)
    padded[..., :lq, :lk] = allowed
    return padded.reshape(*allowed.shape[:2], nq, block, nk, block).any(-1).any(-2)


def _forced(nq: int, nk: int, lq: int, lk: int, block: int, sinks: int, window: int, causal: bool,
            device: torch.device) -> torch.Tensor:
    """Sink blocks and the local window around each query block's diagonal key block."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    diag = (i * block + (lk - lq if causal else 0)).clamp(0, lk - 1) // block  # key block of a row's first query
    near = (j <= diag + (0 if causal else window - 1)) & (j > diag - window)
    return near | (j < sinks)


def _select(score: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row (last dim), the ``keep`` highest-priority allowed blocks, forced blocks first."""
    prio = torch.where(forced, torch.inf, score).masked_fill(~allowed, -torch.inf)
    order = prio.argsort(-1, descending=True)
    ranked = torch.arange(prio.shape[-1], device=prio.device) < keep  # by rank: kept or not
    return torch.zeros_like(allowed).scatter(-1, order, ranked.expand_as(order)) & allowed


def build_block_mask(q, k, mask, *, block, method, topk, sparsity, mass, sinks, window, causal, scale):
    lq, lk = q.shape[-2], k.shape[-2]
    qb, kb = _pool(q, block), repeat_heads(q, _pool(k, block))  # pooled, then shared by the group
    score = qb @ kb.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    allowed = allowed_blocks(mask, causal, lq, lk, block, q.device).expand_as(score)
    forced = _forced(*score.shape[-2:], lq, lk, block, sinks, window, causal, q.device) & allowed
    if method == "topk":
        return _select(score, allowed, forced, forced.sum(-1, keepdim=True) + topk)
    prob = score.masked_fill(~allowed, -torch.inf).softmax(-1).nan_to_num(0.0)
    if method == "sparsity":  # one budget per head, spent on the likeliest blocks of any row
        flat = (-1, score.shape[-2] * score.shape[-1])
        n_allowed, n_forced = allowed.reshape(flat).sum(-1, keepdim=True), forced.reshape(flat).sum(-1, keepdim=True)
        keep = torch.maximum(n_forced, torch.ceil((1 - sparsity) * n_allowed).long())
        return _select(prob.reshape(flat), allowed.reshape(flat), forced.reshape(flat), keep).reshape(score.shape)
    prio = torch.where(forced, torch.inf, prob).masked_fill(~allowed, -1.0)
    ordered = prob.gather(-1, prio.argsort(-1, descending=True))
    before = ordered.cumsum(-1) - ordered  # mass of the blocks ranked ahead
    keep = torch.maximum(forced.sum(-1, keepdim=True), (before < mass).sum(-1, keepdim=True))
    return _select(score, allowed, forced, keep)


def _mask_infer(types, attrs):
    q, k = tensor(types[0], "query"), tensor(types[1], "key")
    b = attrs.get("block", 64)

    def blocks(d):
        return -(-d // b) if isinstance(d, int) else f"ceil({d}/{b})"
    return [TensorType((q.shape[0], q.shape[1], blocks(q.shape[2]), blocks(k.shape[2])), DType.bool)]


def _mask_verify(node):
    a = node.attrs
    if a["method"] not in METHODS:
        raise VerifyError(f"attn.block_mask method must be one of {', '.join(METHODS)}, got {a['method']!r}")
    if a.get("block", 64) < 1 or not 0.0 <= a.get("sparsity", 0.5) < 1.0 or not 0.0 < a.get("mass", 0.95) <= 1.0:
        raise VerifyError("attn.block_mask needs block ≥ 1, 0 ≤ sparsity < 1 and 0 < mass ≤ 1")


@define("attn.block_mask", operands=["query", "key", "mask?"], infer=_mask_infer, verify=_mask_verify,
        attrs=[AttrDef("block", AttrKind.INT, 64), AttrDef("method", AttrKind.STR, "mass"),
               AttrDef("topk", AttrKind.INT, 8), AttrDef("sparsity", AttrKind.FLOAT, 0.5),
               AttrDef("mass", AttrKind.FLOAT, 0.95), AttrDef("sinks", AttrKind.INT, 1),
               AttrDef("window", AttrKind.INT, 2), AttrDef("causal", AttrKind.BOOL, False),
               AttrDef("scale", AttrKind.OPT_FLOAT, None)])
def block_mask(query, key, mask, **attrs):
    return build_block_mask(query, key, mask, **attrs)


def _infer(types, attrs):
    q, v = tensor(types[0], "query"), tensor(types[2], "value")
    mask = tensor(types[3], "block_mask")
    if mask.dtype != DType.bool:
        raise VerifyError(f"block_mask must be bool, got {mask}")
    return [TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)]


def token_mask(block_mask, mask, *, block, causal, lq, lk, dtype):
    """The block mask expanded to tokens, combined with the model's token mask (bool or additive)."""
    keep = expand_block_mask(block_mask, block, lq, lk)
    if causal:
        keep = keep & torch.ones(lq, lk, dtype=torch.bool, device=keep.device).tril(lk - lq)
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return keep & mask
    return mask.to(dtype).masked_fill(~keep, torch.finfo(dtype).min)


@define("attn.block_sparse_sdpa", operands=["query", "key", "value", "block_mask", "mask?"], infer=_infer,
        attrs=[AttrDef("block", AttrKind.INT, 64), AttrDef("causal", AttrKind.BOOL, False),
               AttrDef("scale", AttrKind.OPT_FLOAT, None)])
def block_sparse_sdpa(query, key, value, block_mask, mask, *, block, causal, scale):
    lq, lk = query.shape[-2], key.shape[-2]
    m = token_mask(block_mask, mask, block=block, causal=causal, lq=lq, lk=lk, dtype=query.dtype)
    key, value = repeat_heads(query, key), repeat_heads(query, value)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=m, scale=scale)
