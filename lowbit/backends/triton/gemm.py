"""Scaled int8 / fp8 GEMM: ``y = (A·Bᵀ − z_a ⊗ Σ_k B) · s_a ⊗ s_b + bias``.

For activations ``a`` [M, K] and weights ``b`` [N, K] (both int8, or both float8_e4m3fn)::

    y[m, n] = (Σ_k a[m, k]·b[n, k] − z_a[m]·bsum[n]) · s_a[m] · s_b[n] + bias[n]

with ``bsum[n] = Σ_k b[n, k]`` (precomputed once per weight, :func:`weight_sums`). This is
``(s_a·(a − z_a)) · (s_b·b)ᵀ`` expanded: the zero point of an asymmetric activation costs one
rank-1 correction in the epilogue instead of a subtraction in the inner loop. The sum is
accumulated in int32 for int8 (exact while |y| < 2³¹; each product is at most 2¹⁴, so any
K ≤ 2¹⁷ is safe) and in fp32 for fp8. Scales, zero correction and bias are applied in fp32 in
the epilogue; the result is stored in ``out_dtype``. ``s_a`` is per token [M] or per tensor
[1]; ``s_b`` per channel [N] or per tensor [1]; ``z_a`` is [M], [1] or absent (int8 only).

lowbit stores asymmetric activations as uint8 q with zero point z. Since
``q − z = (q − 128) − (z − 128)``, the same values are int8 ``q − 128`` with zero point
``z − 128`` (:func:`uint8_to_int8`, a bit flip of the top bit), so one signed kernel serves both.

The kernel reads ``b`` row-major [N, K] as Bᵀ through its strides (the weight is packed once,
never transposed at run time), visits output tiles in groups of ``GROUP_M`` rows of tiles so
consecutive programs share B tiles in L2, and masks the K edge (M/N edges wrap on load and are
masked on store).

Example::

    a8, za = uint8_to_int8(qa, zero)                          # asymmetric uint8 activations
    y = scaled_mm(a8, w8, sa, sw, bias, a_zero=za, b_sum=weight_sums(w8))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.backends.triton.runtime import cdiv, interpreting, triton_available, use_triton

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IN_DTYPES = (torch.int8, torch.float8_e4m3fn)


@dataclass(frozen=True)
class MMConfig:
    """One tile configuration of a GEMM kernel (this module's and w4a16's)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# (largest M, config), both 1-byte input types; the first row whose M bound holds wins. Small M
# is memory bound: narrow M tiles and long K tiles keep many loads in flight; large M is compute
# bound: 128×128×128 tiles feed the int8/fp8 tensor cores. On an H200 (benchmarks/tune_kernels.py)
# the 64×128×128 tile was also the fastest at M = 512 (1.3× the 128×128×128 one on 4096×4096).
GPU_CONFIGS: tuple[tuple[int, MMConfig], ...] = (
    (16, MMConfig(16, 64, 256, group_m=1, num_warps=4, num_stages=4)),
    (64, MMConfig(64, 64, 128, group_m=4, num_warps=4, num_stages=4)),
    (512, MMConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4)),
    (1 << 62, MMConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=3)),
)
# The interpreter runs each program in Python: small tiles, few of them, and two tiles per group
# so tests cover a partial group of tiles.
INTERPRET_CONFIG = MMConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=1)


def pick_config(m: int, n: int, k: int) -> MMConfig:
    """The tile configuration for an [m, k] × [k, n] product (``n``/``k`` shrink the tiles)."""
    if interpreting():
        return INTERPRET_CONFIG
    cfg = next(c for bound, c in GPU_CONFIGS if m <= bound)
    # no tile wider than the problem (rounded up to the 16/32 minimum the tensor cores take)
    return replace(cfg, block_n=min(cfg.block_n, max(16, next_pow2(n))),
                   block_k=min(cfg.block_k, max(32, next_pow2(k))))


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of this program: tiles run column by column within groups of
        GROUP_M tile rows, so a group re-reads the same B tiles from L2."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % group_rows, (pid % in_group) // group_rows

    @triton.jit
    def _scaled_mm_kernel(
        a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, za_ptr, bsum_ptr,
        M, N, K, stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        SA_STRIDE: tl.constexpr, SB_STRIDE: tl.constexpr, ZA_STRIDE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_ZERO: tl.constexpr, IS_INT: tl.constexpr,
        MAX_IMPRECISE_ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # rows/columns past the edge wrap onto valid memory; their results are never stored
        a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
        if IS_INT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
            acc = tl.dot(a, b, acc, out_dtype=acc.dtype, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        mask_m = offs_m < M
        mask_n = offs_n < N
        if HAS_ZERO:  # integer rank-1 correction: exact, wraps back into range like the sum
            za = tl.load(za_ptr + offs_m * ZA_STRIDE, mask=mask_m, other=0)
            bsum = tl.load(bsum_ptr + offs_n, mask=mask_n, other=0)
            acc -= za[:, None] * bsum[None, :]
        y = acc.to(tl.float32)
        sa = tl.load(sa_ptr + offs_m * SA_STRIDE, mask=mask_m, other=0.0)
        sb = tl.load(sb_ptr + offs_n * SB_STRIDE, mask=mask_n, other=0.0)
        y = y * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _launch(a, b, a_scale, b_scale, bias, a_zero, b_sum, out_dtype) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    cfg = pick_config(m, n, k)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    dummy = a_scale  # stands in for absent optional pointers; never read
    _scaled_mm_kernel[grid](
        a, b, c, a_scale, b_scale,
        dummy if bias is None else bias, dummy if a_zero is None else a_zero,
        dummy if b_sum is None else b_sum,
        m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        # stride 0 broadcasts a per-tensor scale or zero point
        SA_STRIDE=int(a_scale.numel() > 1), SB_STRIDE=int(b_scale.numel() > 1),
        ZA_STRIDE=int(a_zero is not None and a_zero.numel() > 1),
        HAS_BIAS=bias is not None, HAS_ZERO=a_zero is not None, IS_INT=a.dtype == torch.int8,
        # Hopper's fp8 tensor cores add with a short mantissa; promote into the fp32 accumulator
        # once per K-tile (Triton's sm_90 default never does). None: int8, exact anyway.
        MAX_IMPRECISE_ACC=None if a.dtype == torch.int8 else cfg.block_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return c


def _check_operands(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"scaled_mm: a and b must be 2-D ([M, K] and [N, K]); got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dtype not in IN_DTYPES or b.dtype != a.dtype:
        raise ValueError(f"scaled_mm: a and b must both be int8 or both float8_e4m3fn; got {a.dtype} "
                         f"and {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_mm: K mismatch: a is {tuple(a.shape)} ([M, K]), b is "
                         f"{tuple(b.shape)} ([N, K])")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"scaled_mm: out_dtype must be float16, bfloat16 or float32; got {out_dtype}")


def _check_vector(name: str, t: torch.Tensor | None, sizes: tuple[int, ...], kind: str,
                  device: torch.device) -> None:
    """``t`` holds one value or one per row/column (``sizes``), of a float or integer dtype."""
    if t is None:
        return
    if t.device != device:
        raise ValueError(f"scaled_mm: {name} is on {t.device}, a is on {device}")
    if t.numel() not in sizes or t.dim() > 1:
        raise ValueError(f"scaled_mm: {name} must be 1-D with {' or '.join(map(str, sizes))} "
                         f"elements; got shape {tuple(t.shape)}")
    if (kind == "float") != t.dtype.is_floating_point:
        raise ValueError(f"scaled_mm: {name} must have a {kind} dtype; got {t.dtype}")


def _check(a, b, a_scale, b_scale, bias, a_zero, b_sum, out_dtype) -> None:
    """Raise ValueError naming the first operand whose shape or dtype does not fit the op."""
    _check_operands(a, b, out_dtype)
    m, n, dev = a.shape[0], b.shape[0], a.device
    if b.device != dev:
        raise ValueError(f"scaled_mm: b is on {b.device}, a is on {dev}")
    _check_vector("a_scale", a_scale, (1, m), "float", dev)
    _check_vector("b_scale", b_scale, (1, n), "float", dev)
    _check_vector("bias", bias, (n,), "float", dev)
    _check_vector("a_zero", a_zero, (1, m), "integer", dev)
    _check_vector("b_sum", b_sum, (n,), "integer", dev)
    if a_zero is not None and (b_sum is None or a.dtype != torch.int8):
        raise ValueError("scaled_mm: a_zero needs int8 inputs and b_sum (= b.sum(1), see weight_sums)")


def scaled_mm_reference(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, a_zero: torch.Tensor | None = None,
                        b_sum: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16
                        ) -> torch.Tensor:
    """The op's math in torch: the dot product exact in float64 (int8: every partial sum is an
    integer below 2⁵³; fp8: the exact sum of fp8 products, then rounded to fp32), the epilogue in
    fp32 in the kernel's order ``((acc · s_a) · s_b) + bias``."""
    _check(a, b, a_scale, b_scale, bias, a_zero, b_sum, out_dtype)
    acc = a.double() @ b.double().T
    if a_zero is not None:
        acc = acc - a_zero.double().view(-1, 1) * b_sum.double().view(1, -1)
    y = acc.float() * a_scale.float().view(-1, 1) * b_scale.float().view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@torch.library.custom_op("lowbit::scaled_mm", mutates_args=())
def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, a_zero: torch.Tensor | None = None,
              b_sum: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``(a·bᵀ − a_zero ⊗ b_sum) · a_scale ⊗ b_scale + bias`` (module docstring), in ``out_dtype``.

    Runs the Triton kernel where :func:`use_triton` says so, else :func:`scaled_mm_reference`.

    Example::

        y = scaled_mm(a8, w8, sa, sw, bias, out_dtype=torch.bfloat16)   # [M, K]·[N, K]ᵀ → [M, N]
    """
    _check(a, b, a_scale, b_scale, bias, a_zero, b_sum, out_dtype)
    if not use_triton(a) or (a.dtype == torch.float8_e4m3fn and not a.is_cuda):  # the interpreter's fp8 is wrong
        return scaled_mm_reference(a, b, a_scale, b_scale, bias, a_zero, b_sum, out_dtype)
    return _launch(a, b, a_scale.float().contiguous(), b_scale.float().contiguous(),
                   None if bias is None else bias.contiguous(),
                   None if a_zero is None else a_zero.to(torch.int32).contiguous(),
                   None if b_sum is None else b_sum.to(torch.int32).contiguous(), out_dtype)


@scaled_mm.register_fake
def _scaled_mm_fake(a, b, a_scale, b_scale, bias=None, a_zero=None, b_sum=None, out_dtype=torch.float16):
    _check(a, b, a_scale, b_scale, bias, a_zero, b_sum, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def uint8_to_int8(q: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric uint8 activations as int8 for :func:`scaled_mm`: ``(q − 128, z − 128)``.

    ``s·(q − z) = s·((q − 128) − (z − 128))``, so the dequantized values are unchanged.
    ``q − 128`` is ``q`` with its top bit flipped, read as int8 (no arithmetic, no rounding). The
    zero point comes back as int32, the type the kernel's epilogue uses.

    >>> a8, za = uint8_to_int8(torch.tensor([0, 128, 255], dtype=torch.uint8), torch.tensor([128]))
    >>> a8.tolist(), za.tolist()
    ([-128, 0, 127], [0])
    """
    if q.dtype != torch.uint8:
        raise ValueError(f"uint8_to_int8: q must be uint8; got {q.dtype}")
    return torch.bitwise_xor(q, 0x80).view(torch.int8), zero.to(torch.int32) - 128


def weight_sums(b: torch.Tensor) -> torch.Tensor:
    """``b_sum[n] = Σ_k b[n, k]`` in int32, computed once per int8 weight [N, K] for ``a_zero``."""
    if b.dtype != torch.int8 or b.dim() != 2:
        raise ValueError(f"weight_sums: b must be an int8 [N, K] matrix; got {b.dtype} {tuple(b.shape)}")
    return b.sum(1, dtype=torch.int32)
