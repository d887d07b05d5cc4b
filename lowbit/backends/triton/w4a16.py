"""int4 weights × float activations: ``y = x · Wᵀ + bias`` with ``W[n, k] = (u[n, k] − z) · s``.

Weights are 4-bit codes ``u`` in [0, 15] with a scale ``s`` and zero point ``z`` per output
channel, or per channel and group of G consecutive inputs (G a multiple of 32: 32, 64, 128).
Signed codes q in [−8, 7] are stored as ``u = q + 8`` with the zero point shifted by 8 as well
(symmetric weights: ``z = 8`` and no zeros stored), so ``u − z = q − z_q`` is unchanged.

Packed layout (:func:`pack_int4`), for a weight [N, K] with K a multiple of 32:

* ``qweight``: uint8 [N, K/2]. Each row is cut into chunks of 32 inputs; in chunk c, byte
  ``16c + j`` (j < 16) holds ``u[n, 32c + j]`` in its low nibble and ``u[n, 32c + 16 + j]`` in
  its high nibble. A [BLOCK_K/2, BLOCK_N] byte tile thus unpacks, with one mask and one shift,
  into two weight tiles whose rows are the first and second halves of each chunk; the kernel
  multiplies them by the matching two halves of the activation tile (two ``tl.dot``), with no
  interleaving shuffle.
* ``scales``: fp32 [K/G, N] (per channel: [1, N]), transposed so that one K-tile reads one
  contiguous row of scales. fp32 rather than fp16 because quantizer scales go down to 1e-8.
* ``zeros``: fp32 [K/G, N] like ``scales``, or absent for ``z = 8``. Float zero points are allowed.

The kernel dequantizes each tile in registers in fp32, casts it to the activation dtype and
accumulates ``tl.dot`` in fp32 (fp32 activations use 3-pass TF32, about fp32's accuracy). For few
rows (decoding) it splits K across programs so enough of them stream the weights; each split
writes an fp32 partial sum and a second kernel adds them (in a fixed order: deterministic),
adds the bias and casts.

Example::

    packed = pack_int4(q, scale, zero, group_size=128)     # q: [N, K] int codes
    y = w4a16_linear(x, packed.to("cuda"), bias)          # x: [..., K] fp16 → [..., N] fp16
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from lowbit.backends.triton.gemm import MMConfig, next_pow2
from lowbit.backends.triton.runtime import cdiv, interpreting, triton_available, use_triton

CHUNK = 32  # inputs per packing chunk: 16 bytes, low nibbles then high nibbles
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class PackedInt4:
    """An int4 weight [n, k] packed for :func:`w4a16_mm` (layout in the module docstring).

    ``signed``: the codes were int4 in [−8, 7] (:func:`unpack_int4` subtracts the 8 back).
    ``group_size`` None means one scale per output channel.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int | None
    n: int
    k: int
    signed: bool

    def to(self, device: torch.device | str) -> PackedInt4:
        zeros = None if self.zeros is None else self.zeros.to(device)
        return PackedInt4(self.qweight.to(device), self.scales.to(device), zeros, self.group_size,
                          self.n, self.k, self.signed)


def _check_pack_shapes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       group_size: int | None) -> None:
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack_int4: q must be an integer [N, K] matrix; got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if k % CHUNK:
        raise ValueError(f"pack_int4: K = {k} (q is {tuple(q.shape)}) is not a multiple of {CHUNK}")
    if group_size is not None and (group_size <= 0 or group_size % CHUNK or k % group_size):
        raise ValueError(f"pack_int4: group size {group_size} must be a positive multiple of {CHUNK} "
                         f"dividing K = {k} (q is {tuple(q.shape)})")
    groups = 1 if group_size is None else k // group_size
    if scale.dim() == 0 or scale.numel() != n * groups or scale.shape[0] != n:
        want = f"[{n}]" if group_size is None else f"[{n}, {groups}]"
        raise ValueError(f"pack_int4: scale must be {want} for q {tuple(q.shape)} and group size "
                         f"{group_size}; got {tuple(scale.shape)}")
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"pack_int4: zero must have the scale's shape {tuple(scale.shape)}; "
                         f"got {tuple(zero.shape)}")


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
              group_size: int | None = None, signed: bool | None = None) -> PackedInt4:
    """Pack int4 codes ``q`` [N, K] with ``scale`` ([N, K/G], or [N] per channel) and ``zero``.

    ``signed`` says whether ``q`` is in [−8, 7] or [0, 15]; a zero point, if any, is in the same
    convention as ``q``. By default codes are signed without a zero point, and with one they are
    signed if any is negative (codes in [0, 7] give the same ``q − z`` either way). The codes are
    checked against the range.

    >>> p = pack_int4(torch.randint(-8, 8, (64, 128)), torch.rand(64, 4), group_size=32)
    >>> p.qweight.shape, p.scales.shape, p.zeros
    (torch.Size([64, 64]), torch.Size([4, 64]), None)
    """
    _check_pack_shapes(q, scale, zero, group_size)
    if signed is None:
        signed = zero is None or bool(q.numel() and q.min() < 0)
    lo, hi = (-8, 7) if signed else (0, 15)
    if q.numel() and (q.min() < lo or q.max() > hi):
        raise ValueError(f"pack_int4: {'signed' if signed else 'unsigned'} int4 codes must lie in "
                         f"[{lo}, {hi}]; got [{int(q.min())}, {int(q.max())}]")
    n, k = q.shape
    offset = 8 if signed else 0
    u = (q.to(torch.int16) + offset).to(torch.uint8).reshape(n, k // CHUNK, 2, CHUNK // 2)
    qweight = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    scales = scale.float().reshape(n, -1).T.contiguous()
    if zero is not None:
        zeros = (zero.float().reshape(n, -1) + offset).T.contiguous()
    else:  # unsigned codes without a zero point: z = 0 must be stored (the default is 8)
        zeros = None if signed else torch.zeros_like(scales)
    return PackedInt4(qweight, scales, zeros, group_size, n, k, signed)


def _unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """The stored codes ``u`` [N, K] (uint8, in [0, 15]) of a packed ``qweight`` [N, K/2]."""
    n, half = qweight.shape
    b = qweight.reshape(n, half * 2 // CHUNK, 1, CHUNK // 2)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(n, half * 2)


def unpack_int4(packed: PackedInt4) -> torch.Tensor:
    """The int4 codes [N, K] (int8) that :func:`pack_int4` was given."""
    u = _unpack_nibbles(packed.qweight).to(torch.int8)
    return u - 8 if packed.signed else u


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    """``W[n, k] = (u[n, k] − z) · s`` in fp32 [N, K]; ``group_size`` 0 means per channel."""
    u = _unpack_nibbles(qweight).float()
    g = group_size or u.shape[1]
    s = scales.float().T.repeat_interleave(g, dim=1)
    z = 8.0 if zeros is None else zeros.float().T.repeat_interleave(g, dim=1)
    return (u - z) * s


@dataclass(frozen=True)
class W4Config:
    """Tiles of the w4a16 kernel plus its split-K policy: split K until ``programs_per_sm``
    programs per SM run, keeping at least ``min_k_tiles`` K-tiles per split."""

    tile: MMConfig
    programs_per_sm: int = 0
    min_k_tiles: int = 4


# (largest M, config). Decoding is bound by reading the weights: split K so ~4 programs per SM
# keep loads in flight; on an H200 (benchmarks/tune_kernels.py, CUDA graphs, 4096×4096 and
# 4096×11008) 128-wide tiles in 3 stages were the fastest of 18 candidates at M = 1 and 16
# (1.3× the 64-wide, 4-stage tile they replace at M = 1). Prefill is bound by the tensor cores:
# the dequantized [BLOCK_K, BLOCK_N] tile is reused by BLOCK_M rows (no candidate beat the
# 128×128×64 tile at M = 512 or 2048). BLOCK_K is also capped by the group size.
GPU_CONFIGS: tuple[tuple[int, W4Config], ...] = (
    (16, W4Config(MMConfig(16, 128, 128, group_m=1, num_warps=4, num_stages=3), programs_per_sm=4)),
    (64, W4Config(MMConfig(32, 64, 128, group_m=4, num_warps=4, num_stages=4), programs_per_sm=2)),
    (256, W4Config(MMConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4))),
    (1 << 62, W4Config(MMConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3))),
)
# Interpreter: small tiles, a two-program target so small-M tests run split K.
INTERPRET_CONFIGS: tuple[tuple[int, W4Config], ...] = (
    (16, W4Config(MMConfig(16, 32, 64, group_m=2, num_stages=1), programs_per_sm=4, min_k_tiles=1)),
    (1 << 62, W4Config(MMConfig(16, 32, 64, group_m=2, num_stages=1))),
)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_w4_config(m: int, n: int, k: int, group_size: int, device: torch.device
                   ) -> tuple[MMConfig, int]:
    """(tile configuration, number of K splits) for x [m, k] and a weight [n, k]."""
    table = INTERPRET_CONFIGS if interpreting() else GPU_CONFIGS
    cfg = next(c for bound, c in table if m <= bound)
    # BLOCK_K: a power of two dividing the group (a tile never straddles two groups), ≤ K
    pow2_of_group = group_size & -group_size if group_size else cfg.tile.block_k
    block_k = max(CHUNK, min(cfg.tile.block_k, pow2_of_group, next_pow2(k)))
    tile = replace(cfg.tile, block_n=min(cfg.tile.block_n, max(16, next_pow2(n))), block_k=block_k)
    tiles = cdiv(m, tile.block_m) * cdiv(n, tile.block_n)
    splits, k_tiles = 1, cdiv(k, block_k)
    target = cfg.programs_per_sm * _sm_count(device)
    while tiles * splits < target and 2 * splits * cfg.min_k_tiles <= k_tiles:
        splits *= 2
    return tile, splits


if triton_available():
    import triton
    import triton.language as tl

    from lowbit.backends.triton.gemm import grouped_tile_ids

    @triton.jit
    def _w4a16_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
        M, N, K, K_PER_SPLIT, stride_xm, stride_xk, stride_wn, stride_os, stride_om,
        GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        p = tl.arange(0, BLOCK_K // 2)  # byte within the tile's row of packed weights
        k_lo = (p // 16) * 32 + p % 16  # input index of byte p's low nibble (high: + 16)
        x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + k_lo[None, :] * stride_xk
        w_ptrs = w_ptr + (offs_n % N)[None, :] * stride_wn + p[:, None]
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(K, k_start + K_PER_SPLIT)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            # K and k_end are multiples of 32, so chunks are wholly in or out
            in_k = k_lo < k_end - k0
            x_lo = tl.load(x_ptrs + k0 * stride_xk, mask=in_k[None, :], other=0.0)
            x_hi = tl.load(x_ptrs + (k0 + 16) * stride_xk, mask=in_k[None, :], other=0.0)
            packed = tl.load(w_ptrs + k0 // 2, mask=in_k[:, None], other=0)
            row = (k0 // GROUP) * N if GROUP > 0 else 0  # the tile's row of scales/zeros
            s = tl.load(s_ptr + row + offs_n % N)[None, :]
            z = tl.load(z_ptr + row + offs_n % N)[None, :] if HAS_ZERO else 8.0
            w_lo = (((packed & 0xF).to(tl.float32) - z) * s).to(x_lo.dtype)
            w_hi = (((packed >> 4).to(tl.float32) - z) * s).to(x_lo.dtype)
            acc = tl.dot(x_lo, w_lo, acc, input_precision="tf32x3", out_dtype=tl.float32)
            acc = tl.dot(x_hi, w_hi, acc, input_precision="tf32x3", out_dtype=tl.float32)
        mask_n = offs_n < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])

    @triton.jit
    def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLITS: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """out = Σ_s part[s] + bias, summed in split order (deterministic), cast to out's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    tile, splits = pick_w4_config(m, n, k, group_size, x.device)
    k_per_split = cdiv(cdiv(k, splits), tile.block_k) * tile.block_k
    # with split K each program writes an fp32 partial sum; bias and cast come after the sum
    dst = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (cdiv(m, tile.block_m) * cdiv(n, tile.block_n), splits)
    _w4a16_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, scales if bias is None else bias, dst,
        m, n, k, k_per_split, x.stride(0), x.stride(1), qweight.stride(0), m * n, n,
        GROUP=group_size, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None and splits == 1,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(cdiv(m * n, block),)](
            dst, dst if bias is None else bias, out, m * n, n,
            SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block)
    return out


def _check(x, qweight, scales, zeros, group_size, bias) -> None:
    """Raise ValueError naming the first operand that does not fit ``w4a16_mm``."""
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"w4a16_mm: x must be a float16/bfloat16/float32 [M, K] matrix; got "
                         f"{x.dtype} {tuple(x.shape)}")
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(f"w4a16_mm: qweight must be packed uint8 [N, K/2]; got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    k, n = x.shape[1], qweight.shape[0]
    if qweight.shape[1] * 2 != k or k % CHUNK:
        raise ValueError(f"w4a16_mm: K mismatch: x is {tuple(x.shape)} ([M, K], K a multiple of "
                         f"{CHUNK}), qweight is {tuple(qweight.shape)} ([N, K/2])")
    if group_size < 0 or group_size % CHUNK or (group_size and k % group_size):
        raise ValueError(f"w4a16_mm: group size {group_size} must be 0 (per channel) or a multiple "
                         f"of {CHUNK} dividing K = {k}")
    want = (k // group_size if group_size else 1, n)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and (tuple(t.shape) != want or not t.dtype.is_floating_point):
            raise ValueError(f"w4a16_mm: {name} must be float {list(want)} ([K/G, N]); got "
                             f"{t.dtype} {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"w4a16_mm: bias must be [{n}]; got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"w4a16_mm: {name} is on {t.device}, x is on {x.device}")


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, group_size: int, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    """``linear(x, ((u − z)·s in fp32).to(x.dtype), bias)``: the op's math in torch."""
    _check(x, qweight, scales, zeros, group_size, bias)
    w = dequantize_int4(qweight, scales, zeros, group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("lowbit::w4a16_mm", mutates_args=())
def w4a16_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x · Wᵀ + bias`` for a packed int4 weight (module docstring), in ``x.dtype``.

    ``group_size`` 0 means per channel; ``zeros`` None means ``z = 8`` (signed codes). Runs the
    Triton kernel where :func:`use_triton` says so, else :func:`w4a16_reference`.

    Example::

        p = pack_int4(q, scale, group_size=128)
        y = w4a16_mm(x, p.qweight, p.scales, p.zeros, 128, None)      # [M, K] → [M, N]
    """
    _check(x, qweight, scales, zeros, group_size, bias)
    if not use_triton(x):
        return w4a16_reference(x, qweight, scales, zeros, group_size, bias)
    return _launch(x, qweight.contiguous(), scales.float().contiguous(),
                   None if zeros is None else zeros.float().contiguous(), group_size,
                   None if bias is None else bias.contiguous())


@w4a16_mm.register_fake
def _w4a16_mm_fake(x, qweight, scales, zeros, group_size, bias):
    _check(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], qweight.shape[0]))


def w4a16_linear(x: torch.Tensor, packed: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for x [..., K] and a packed int4 weight W [N, K] → [..., N].

    >>> q, scale = torch.randint(-8, 8, (64, 128)), torch.rand(64, 4)
    >>> w4a16_linear(torch.randn(2, 5, 128), pack_int4(q, scale, group_size=32)).shape
    torch.Size([2, 5, 64])
    """
    if x.shape[-1] != packed.k:
        raise ValueError(f"w4a16_linear: x has {x.shape[-1]} input features, the weight "
                         f"[{packed.n}, {packed.k}] takes {packed.k}")
    lead = x.shape[:-1]
    y = w4a16_mm(x.reshape(math.prod(lead), packed.k), packed.qweight, packed.scales,
                 packed.zeros, packed.group_size or 0, bias)
    return y.reshape(*lead, packed.n)
