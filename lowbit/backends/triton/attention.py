"""Block-sparse flash attention (forward): the Triton kernel of ``attn.block_sparse_sdpa``.

Math, per batch b and query head h (kv head h // (Hq/Hkv), grouped-query attention):

    S = scale · Q Kᵀ,   S_ij = −∞ unless block_mask[b, h, i // block, j // block]
                               (and j ≤ i + Lk − Lq when causal: lower triangle aligned at the end)
    O = softmax(S) V                                  (default scale 1/√D)

A row that keeps no key at all is 0, in the kernel and in the reference (SDPA gives NaN there
on some backends and versions, so the reference sets it explicitly).

Kernel (FlashAttention-2 forward): one program per (query tile, batch·head). The program walks
only the key blocks listed for its tile, keeping a running row max m, row sum l and an fp32
accumulator (``online softmax``); exponentials are ``exp2`` with log2(e)·scale folded into the
scores, so e^(s−m) = 2^(s·log2e − m'). Per key tile:

    m' = max(m, rowmax(S_t)),  α = 2^(m − m'),  P = 2^(S_t − m'),
    l ← α l + rowsum(P),        acc ← α acc + P V_t,      and at the end  O = acc / l.

Tiles and mask blocks (``tile_config``): the query tile is BLOCK_M rows and the key tile
BLOCK_N columns. BLOCK_N divides ``block`` (a listed key block is walked as block/BLOCK_N
tiles), and BLOCK_M is ``block`` or a multiple of it: with block = 64 on a GPU the tile is 128
queries × 64 keys, so one tile covers two mask query blocks. Its key list is then the union
(OR) of the two blocks' lists, and inside the loop each row checks its own mask bit for the
key block (one byte per row, a broadcast load). Causal masking and the Lk tail are applied with
elementwise selects when they can occur (constexpr flags), never otherwise. Key blocks that lie
entirely above the causal diagonal are dropped when the lists are built, not in the kernel.

Example::

    out = block_sparse_attention(q, k, v, block_mask, 64, True)
    counts, indices = kernel_block_indices(block_mask, 64, q.shape[-2], k.shape[-2], True, q.shape[-1])
    out = block_sparse_attention_indexed(q, k, v, block_mask, counts, indices, 64, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.backends.triton.runtime import cdiv, triton_available, use_triton
from lowbit.ir.dialects.attn import causal_block_mask, repeat_heads, token_mask

if triton_available():
    import triton
    import triton.language as tl
else:  # the references still run; ``_jit`` leaves the kernel functions plain and unused
    triton = tl = None

BLOCKS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634


# ---- mask → index lists (torch ops on the mask's device) ---------------------------------

def block_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept key blocks per query block, as counts and ascending index lists.

    ``block_mask`` is bool [..., nQ, nK]. Returns ``counts`` int32 [..., nQ] (how many key
    blocks the row keeps) and ``indices`` int32 [..., nQ, max(counts)]: row r's kept key-block
    numbers in ascending order, padded with 0. The kept blocks are scattered to the positions
    cumsum − 1 (the dropped ones to a discarded extra column), so no sort and no Python loop.

    >>> block_indices(torch.tensor([[True, False, True]]))
    (tensor([2], dtype=torch.int32), tensor([[0, 2]], dtype=torch.int32))
    """
    keep = block_mask.to(torch.bool)
    counts = keep.sum(-1, dtype=torch.int32)
    width = int(counts.max()) if counts.numel() else 0  # one host sync: the lists' width
    pos = torch.where(keep, keep.cumsum(-1) - 1, width)
    numbers = torch.arange(keep.shape[-1], dtype=torch.int32, device=keep.device).expand_as(pos)
    out = torch.zeros((*keep.shape[:-1], width + 1), dtype=torch.int32, device=keep.device)
    out.scatter_(-1, pos, numbers)
    return counts, out[..., :width]


def kernel_block_indices(block_mask: torch.Tensor, block: int, lq: int, lk: int, causal: bool,
                         head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (counts, indices) the kernel reads: one list per *query tile* of the kernel.

    Blocks wholly above the causal diagonal are dropped, then each tile's ``query_group``
    consecutive query blocks (see ``tile_config``) are OR-ed into one list. Build these once per
    mask to time index building apart from ``block_sparse_attention_indexed``."""
    group = tile_config(block, head_dim).query_group
    keep = block_mask.to(torch.bool)
    if causal:
        keep = keep & causal_block_mask(*keep.shape[-2:], block, lq, lk, keep.device)
    if group > 1:
        pad = -keep.shape[-2] % group
        keep = F.pad(keep, (0, 0, 0, pad))
        keep = keep.unflatten(-2, (keep.shape[-2] // group, group)).any(-2)
    return block_indices(keep)


# ---- tiles ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    """A launch configuration; ``block_m`` is a multiple of the mask block, ``block_n`` divides it."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block: int

    @property
    def query_group(self) -> int:
        """Mask query blocks per query tile."""
        return self.block_m // self.block

    @property
    def key_split(self) -> int:
        """Key tiles per mask key block."""
        return self.block // self.block_n


def tile_config(block: int, head_dim: int) -> TileConfig:
    """128×64 tiles for block ≥ 64 (FlashAttention-2's tile for fp16 on H100, D ≤ 128);
    block×block tiles for smaller blocks, because a taller query tile would OR several
    fine-grained rows together and walk blocks most of its rows drop. A 128-row tile gets 8
    warps (two warpgroups of 64 rows): with 4, ptxas reports serialized wgmma (D = 64) or
    255 registers and spills (D = 128) for sm_90. 3 pipeline stages where shared memory allows
    (D ≤ 64), else 2. Not autotuned. The interpreter gets the same tiles, so the CPU tests walk
    the GPU's code paths (tile over 2 mask blocks at block 64, 2 key tiles per block at 128)."""
    if block not in BLOCKS:
        raise ValueError(f"block_sparse_attention: block must be one of {BLOCKS}, got {block}")
    block_m = 128 if block >= 64 else block
    return TileConfig(block_m, min(block, 64), num_warps=8 if block_m == 128 else 4,
                      num_stages=3 if head_dim <= 64 else 2, block=block)


# ---- the kernel ----------------------------------------------------------------------------

def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _load_tile(ptrs, rows, cols, n_rows, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A [rows, cols] tile, zero outside n_rows × n_cols; unmasked where the sizes allow."""
    if EVEN_ROWS and EVEN_COLS:
        return tl.load(ptrs)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptrs, mask=mask, other=0.0)


@_jit
def _mask_scores(s, offs_m, offs_n, kb, mask_row_ptr, smq, smk, lq, lk, causal_offset,
                 BLOCK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_K: tl.constexpr,
                 GROUPED: tl.constexpr):
    """−∞ where a key is past Lk, above the causal diagonal, or (tile over several mask query
    blocks) in a key block the row's own query block drops."""
    if not EVEN_K:
        s = tl.where(offs_n[None, :] < lk, s, float("-inf"))
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_offset, s, float("-inf"))
    if GROUPED:
        bits = tl.load(mask_row_ptr + (offs_m // BLOCK) * smq + kb * smk, mask=offs_m < lq, other=0)
        s = tl.where(bits[:, None] != 0, s, float("-inf"))
    return s


@_jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One FlashAttention-2 update with scores s already in log2 units. A row with no key kept
    so far has m' = −∞; it uses 0 instead so that α and P are 0, not NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@_jit
def _block_sparse_fwd(Q, K, V, O, MASK, COUNTS, INDICES,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      sob, soh, som, sod, smb, smh, smq, smk, scb, sch, sct, sib, sih, sit, sii,
                      n_heads, kv_group, lq, lk, causal_offset, qk_scale,
                      BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      CAUSAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
                      GROUPED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """O[b, h, tile] = softmax over the listed key blocks; see the module docstring."""
    # Last tiles first: under a causal mask they walk the most key blocks, and starting them
    # early keeps the tail of the launch from waiting on a few long programs.
    tile, bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d, offs_dv = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                   offs_m, offs_d, lq, D, EVEN_M, BLOCK_D == D)
    k_base = K + b * skb + (h // kv_group) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_base = V + b * svb + (h // kv_group) * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd
    count = tl.load(COUNTS + b * scb + h * sch + tile * sct)
    index_row = INDICES + b * sib + h * sih + tile * sit
    mask_row = MASK + b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # One flat loop over (listed block, key tile within it): a single loop the pipeliner can
    # prefetch across, K/V pointers advanced by the listed block number.
    for j in range(count * (BLOCK // BLOCK_N)):
        kb = tl.load(index_row + (j // (BLOCK // BLOCK_N)) * sii)
        start_n = kb * BLOCK + (j % (BLOCK // BLOCK_N)) * BLOCK_N
        k = _load_tile(k_base + start_n * skn, start_n + offs_n, offs_d, lk, D, EVEN_K, BLOCK_D == D)
        v = _load_tile(v_base + start_n * svn, start_n + offs_n, offs_dv, lk, DV, EVEN_K, BLOCK_DV == DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, offs_m, start_n + offs_n, kb, mask_row, smq, smk, lq, lk, causal_offset,
                         BLOCK, CAUSAL, EVEN_K, GROUPED)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no kept key: acc is 0, so is the row
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < lq) & (offs_dv[None, :] < DV))


# ---- launch --------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block: int) -> None:
    """Shapes and dtypes the op accepts; the message names the offending argument."""
    name = "block_sparse_attention"
    if block not in BLOCKS:
        raise ValueError(f"{name}: block must be one of {BLOCKS}, got {block}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be [B, H, L, D], got {shapes}")
    (bq, hq, lq, d), (bk, hkv, lk, dk) = q.shape, k.shape
    if bk != bq or v.shape[:3] != k.shape[:3] or dk != d or hq % hkv:
        raise ValueError(f"{name}: {shapes} do not fit (same batch, Hq a multiple of Hkv, k's head dim = q's)")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    want = (cdiv(lq, block), cdiv(lk, block))
    mb, mh, *blocks = block_mask.shape if block_mask.dim() == 4 else (None, None)
    if block_mask.dtype != torch.bool or mb not in (1, bq) or mh not in (1, hq) or tuple(blocks) != want:
        raise ValueError(f"{name}: block_mask must be bool [{bq} or 1, {hq} or 1, {want[0]}, {want[1]}] "
                         f"for block {block}, got {block_mask.dtype} {tuple(block_mask.shape)}")
    if not (k.device == v.device == block_mask.device == q.device):
        raise ValueError(f"{name}: q, k, v and block_mask must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}, {block_mask.device}")


def _launch(q, k, v, block_mask, counts, indices, block: int, causal: bool, scale: float,
            cfg: TileConfig) -> torch.Tensor:
    """Run the kernel with lists built for ``cfg``'s query tiles (``kernel_block_indices``)."""
    (b, hq, lq, d), (hkv, lk, dv) = q.shape, (k.shape[1], k.shape[2], v.shape[-1])
    n_tiles = cdiv(lq, cfg.block_m)
    if counts.dim() != 3 or counts.shape[-1] != n_tiles or indices.shape[:-1] != counts.shape:
        raise ValueError(f"block_sparse_attention_indexed: counts {tuple(counts.shape)} / indices "
                         f"{tuple(indices.shape)} are not per query tile of {cfg.block_m} rows "
                         f"({n_tiles} tiles); build them with kernel_block_indices")
    out = q.new_empty(b, lq, hq, dv).transpose(1, 2)  # SDPA's layout: a model's transpose + view after it works
    if out.numel() == 0:
        return out
    mask = block_mask.view(torch.uint8).expand(b, hq, -1, -1)
    counts, indices = counts.expand(b, hq, -1), indices.expand(b, hq, *indices.shape[-2:])
    if indices.shape[-1] == 0:  # nothing kept anywhere: the kernel loads no index, any pointer does
        indices = counts.new_zeros(b, hq, n_tiles, 1)
    _block_sparse_fwd[(n_tiles, b * hq)](
        q, k, v, out, mask, counts, indices, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *mask.stride(), *counts.stride(), *indices.stride(),
        hq, hq // hkv, lq, lk, lk - lq, scale * _LOG2E,
        BLOCK=block, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D=d, DV=dv,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        CAUSAL=causal, EVEN_M=lq % cfg.block_m == 0, EVEN_K=lk % block == 0,
        GROUPED=cfg.query_group > 1, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ---- reference and the public ops ------------------------------------------------------------

def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     block_mask: torch.Tensor, block: int, causal: bool,
                                     scale: float | None = None) -> torch.Tensor:
    """``attn.block_sparse_sdpa`` in torch: SDPA with the block mask expanded to tokens, k/v heads
    repeated for grouped-query attention, rows that keep no key set to 0 (SDPA may give NaN)."""
    lq, lk = q.shape[-2], k.shape[-2]
    k, v = repeat_heads(q, k), repeat_heads(q, v)
    mask = token_mask(block_mask, None, block=block, causal=causal, lq=lq, lk=lk, dtype=q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = out.masked_fill(~mask.any(-1, keepdim=True), 0)
    return q.new_empty(q.shape[0], lq, q.shape[1], v.shape[-1]).transpose(1, 2).copy_(out)  # the kernel's layout


@torch.library.custom_op("lowbit::block_sparse_attention_indexed", mutates_args=())
def block_sparse_attention_indexed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   block_mask: torch.Tensor, counts: torch.Tensor,
                                   indices: torch.Tensor, block: int, causal: bool,
                                   scale: float | None = None) -> torch.Tensor:
    """``block_sparse_attention`` with the kernel's index lists given (from
    ``kernel_block_indices(block_mask, block, Lq, Lk, causal, D)``), so that building them is
    timed apart. The reference path ignores counts and indices."""
    _check(q, k, v, block_mask, block)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not use_triton(q):
        return block_sparse_attention_reference(q, k, v, block_mask, block, causal, scale)
    return _launch(q, k, v, block_mask, counts, indices, block, causal, scale,
                   tile_config(block, q.shape[-1]))


@torch.library.custom_op("lowbit::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                           block: int, causal: bool, scale: float | None = None) -> torch.Tensor:
    """softmax(scale·QKᵀ masked by ``block_mask`` (and causally)) V; q [B, Hq, Lq, D], k/v
    [B, Hkv, Lk, D], block_mask bool [B|1, Hq|1, ⌈Lq/block⌉, ⌈Lk/block⌉]. Output [B, Hq, Lq, Dv]
    in q's dtype; a row with no kept key is 0. Forward only (no autograd formula)."""
    _check(q, k, v, block_mask, block)
    if not use_triton(q):
        return block_sparse_attention_reference(q, k, v, block_mask, block, causal, scale)
    counts, indices = kernel_block_indices(block_mask, block, q.shape[-2], k.shape[-2], causal, q.shape[-1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _launch(q, k, v, block_mask, counts, indices, block, causal, scale,
                   tile_config(block, q.shape[-1]))


def _fake_output(q, k, v, block_mask, block) -> torch.Tensor:
    _check(q, k, v, block_mask, block)  # so that tracing rejects what running would
    b, h, lq, _ = q.shape
    return q.new_empty(b, lq, h, v.shape[-1]).transpose(1, 2)


@block_sparse_attention.register_fake
def _(q, k, v, block_mask, block, causal, scale=None):
    return _fake_output(q, k, v, block_mask, block)


@block_sparse_attention_indexed.register_fake
def _(q, k, v, block_mask, counts, indices, block, causal, scale=None):
    return _fake_output(q, k, v, block_mask, block)
