"""The ``attn`` dialect: block-sparse attention.

``attn.block_sparse_sdpa(q, k, v, block_mask)`` attends only within the (query block, key
block) pairs that ``block_mask`` [batch, heads, ⌈Lq/block⌉, ⌈Lk/block⌉] keeps; its reference is
SDPA with the block mask expanded to tokens. A query row must keep at least one key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import VerifyError
from lowbit.ir.attrs import AttrKind
from lowbit.ir.dialects.infer import tensor
from lowbit.ir.opdef import AttrDef, define
from lowbit.ir.types import DType, TensorType


def expand_block_mask(block_mask: torch.Tensor, block: int, lq: int, lk: int) -> torch.Tensor:
    m = block_mask.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return m[..., :lq, :lk]


def _infer(types, attrs):
    q, v = tensor(types[0], "query"), tensor(types[2], "value")
    mask = tensor(types[3], "block_mask")
    if mask.dtype != DType.bool:
        raise VerifyError(f"block_mask must be bool, got {mask}")
    return [TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)]


@define("attn.block_sparse_sdpa", operands=["query", "key", "value", "block_mask"], infer=_infer,
        attrs=[AttrDef("block", AttrKind.INT, 64), AttrDef("causal", AttrKind.BOOL, False)])
def block_sparse_sdpa(query, key, value, block_mask, *, block, causal):
    lq, lk = query.shape[-2], key.shape[-2]
    mask = expand_block_mask(block_mask, block, lq, lk)
    if causal:
        mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril(lk - lq)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
