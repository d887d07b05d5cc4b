"""Activation-side kernels: per-token dynamic quantization, the online Hadamard rotation, and both
fused (rotate, then quantize, without the rotated activation going to memory).

Per-token quantization over the last dim, to the SIGNED range of ``bits``
(qmin = −2^(bits−1), qmax = 2^(bits−1) − 1; int4 codes held one per int8), all in fp32::

    lo = min(min x, 0)·c,  hi = max(max x, 0)·c                  (c: the clip ratio, 1 by default)
    symmetric:   s = max(max(hi, −lo) / qmax, EPS)  (8 bits),    z = 0
                 s = max(hi / qmax, lo / qmin, EPS)  (4 bits: every code used)
    asymmetric:  s = max((hi − lo) / (qmax − qmin), EPS)
                 z = clamp(round(−lo/s), 0, qmax − qmin) + qmin
    q = clamp(round(x / s) + z, qmin, qmax)                      (round: half to even)

This is ``quant.dynamic_quantize`` bit for bit: symmetric with the signed dtype (i8 / i4), and
asymmetric with the UNSIGNED dtype (u8 / u4, lowbit's asymmetric activations) shifted by
2^(bits−1): uint8 q with zero z is int8 q − 128 with zero z − 128 (one signed GEMM serves both).
The reference computes an unsigned zero as round(0 − lo/s); computing round(qmin − lo/s) in
fp32 instead would differ by one when −lo/s lies within an fp32 rounding of a half-integer, so
the shift is applied after rounding. Divisions are correctly rounded (``div_rn``), as torch's.

Rotation: y = x·H_nᵀ/√n (``hadamard_transform``) with n = a·b, H_n = H_a ⊗ H_b, a = m·2^i
(m a Hadamard base) and b = 2^j (Sylvester, symmetric). Viewing a row as the row-major [a, b]
matrix X, x·(H_a ⊗ H_b)ᵀ = vec(H_a·X·H_bᵀ): two small ``tl.dot``\\ s per row with ±1 matrices
(H_a zero-padded to a power of two ≥ 16; the padded rows of the result are 0, which changes
neither the row's amax nor min(·, 0) / max(·, 0), so the fused quantizer reads them harmlessly).
fp16/bf16 inputs: the products run in the input dtype with fp32 accumulation, T = X·H_b/√b is
rounded to the input dtype before the second product and y to it before quantizing, so
``hadamard_quant(x) == dynamic_quant(hadamard(x))`` exactly. Against the fp64 rotation this is
≈ 2 roundings of the input dtype (fp16: relative error ≲ 1e-3); fp32 uses IEEE products
(relative error ~1e-7). Sizes without a split (:func:`hadamard_split`) run the torch reference.

NaN: the kernels' min/max do not propagate NaN as torch's amax does; results are defined for
NaN-free inputs only. Every op falls back to its torch reference when :func:`use_triton` says so.

Example::

    q, s, z = dynamic_quant(x)                 # x [..., K] → int8 [..., K], fp32 [...], int32 [...]
    q, s, z = hadamard_quant(x, 8, False)      # rotate, then asymmetric per-token int8
"""

from __future__ import annotations

import functools
import math

import torch

from lowbit.backends.triton.runtime import cdiv, triton_available, use_triton
from lowbit.ir.dialects.hadamard import base_matrix, factor, hadamard_transform, plan
from lowbit.ir.dialects.quant import EPS, dynamic_quantize, quantize
from lowbit.ir.dialects.rotate import sylvester_hadamard
from lowbit.ir.types import DType

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (bits, symmetric) → the reference dtype whose codes, shifted by 2^(bits−1) when unsigned, are ours
_REFERENCE_DTYPES = {(8, True): DType.i8, (4, True): DType.i4, (8, False): DType.u8, (4, False): DType.u4}
ROW_MAX = 16384  # longest row held whole in registers; longer rows take two passes over memory
LOOP_BLOCK = 4096  # chunk of a long row per pass
PROGRAM_ELEMS = 4096  # short rows: this many elements per program, several rows each
MAX_ROWS = 16
MIN_DOT, MAX_A, MAX_B = 16, 128, 128  # tl.dot's smallest side; the largest ±1 operands kept on chip


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@functools.lru_cache(maxsize=None)
def hadamard_split(n: int) -> tuple[int, int] | None:
    """(a, b) with n = a·b for the rotation kernels, or None (the torch reference runs).

    b = 2^j in [16, 128], a = m·2^i padded to a power of two ≥ 16 that is at most 128; among
    those, the fewest multiply-adds per row, pad(a)·b·(pad(a) + b), larger b on a tie.
    E.g. 4096 → (64, 64), 8192 → (64, 128), 768 → (24, 32), 1280 → (20, 64); 2240 = 140·16 and
    32768 have none.
    """
    if not plan(n).exact:  # an orthogonal substitute's entries are not exact in half precision
        return None
    _, p = factor(n)
    best = None
    b = MIN_DOT
    while b <= min(p, MAX_B):
        a_pad = _next_pow2(max(n // b, MIN_DOT))
        cost = a_pad * b * (a_pad + b)
        if a_pad <= MAX_A and (best is None or cost <= best[0]):
            best = (cost, n // b, b)
        b *= 2
    return None if best is None else best[1:]


@functools.lru_cache(maxsize=64)
def _hadamard_operands(a: int, b: int, dtype: torch.dtype, device: torch.device):
    """The operands (±1, exact in every float dtype, where the plan is a Hadamard matrix):
    H_a = B ⊗ H_{a/m} (B: the bases of n = a·b, of order m) zero-padded to [pad(a), pad(a)], H_b."""
    a_pad = _next_pow2(max(a, MIN_DOT))
    base = base_matrix(a * b)
    ha = torch.zeros(a_pad, a_pad, dtype=torch.float64)
    ha[:a, :a] = torch.kron(base, sylvester_hadamard(a // base.shape[0]).double())
    return ha.to(device=device, dtype=dtype), sylvester_hadamard(b).to(device=device, dtype=dtype)


# ---- kernels ---------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    _EPS = tl.constexpr(EPS)

    @triton.jit
    def _round_half_even(v):
        """round(v), ties to even, exact for every finite fp32 v (v − ⌊v⌋ is exact in fp32;
        floor(v + 0.5) is not: 0.49999997 + 0.5 rounds up to 1)."""
        r = tl.floor(v)
        d = v - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)

    @triton.jit
    def _scale_zero(lo, hi, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr):
        """Scale and zero point from lo = min(min x, 0), hi = max(max x, 0) (module docstring)."""
        if SYMMETRIC:
            if QMAX < 127:  # below 8 bits: max x → qmax or min x → qmin, whichever needs more
                scale = tl.maximum(tl.maximum(tl.math.div_rn(hi, QMAX * 1.0), tl.math.div_rn(lo, QMIN * 1.0)), _EPS)
            else:
                scale = tl.maximum(tl.math.div_rn(tl.maximum(hi, -lo), QMAX * 1.0), _EPS)
            zero = tl.zeros_like(scale)
        else:
            scale = tl.maximum(tl.math.div_rn(hi - lo, (QMAX - QMIN) * 1.0), _EPS)
            z = _round_half_even(-tl.math.div_rn(lo, scale))  # the unsigned zero point
            zero = tl.minimum(tl.maximum(z, 0.0), (QMAX - QMIN) * 1.0) + QMIN
        return scale, zero

    @triton.jit
    def _quantize(x, scale, zero, QMIN: tl.constexpr, QMAX: tl.constexpr):
        """clamp(round(x / s) + z, qmin, qmax) as int8; s and z broadcast against x."""
        x, scale = tl.broadcast(x, scale)
        q = _round_half_even(tl.math.div_rn(x, scale)) + zero
        return tl.minimum(tl.maximum(q, QMIN * 1.0), QMAX * 1.0).to(tl.int8)

    @triton.jit
    def _row_range_looped(x_rows, row_ok, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """(min(min x, 0), max(max x, 0)) per row, reading the rows in chunks of BLOCK_K."""
        cols = tl.arange(0, BLOCK_K)
        lo = tl.zeros([BLOCK_M], tl.float32)
        hi = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k0 + cols < K)[None, :]
            x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(x, 1))
            hi = tl.maximum(hi, tl.max(x, 1))
        return lo, hi

    @triton.jit
    def _quantize_looped(x_rows, q_rows, row_ok, K, scale, zero, QMIN: tl.constexpr,
                         QMAX: tl.constexpr, BLOCK_K: tl.constexpr):
        """The second pass over long rows: quantize and store chunk by chunk."""
        cols = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k0 + cols < K)[None, :]
            x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            q = _quantize(x, scale[:, None], zero[:, None], QMIN, QMAX)
            tl.store(q_rows + k0 + cols[None, :], q, mask=mask)

    @triton.jit
    def _dynamic_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, M, K, clip, QMIN: tl.constexpr,
                              QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
        """BLOCK_M rows per program; a row held whole (ONE_PASS) or read twice in chunks."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        x_rows = x_ptr + rows[:, None].to(tl.int64) * K
        q_rows = q_ptr + rows[:, None].to(tl.int64) * K
        if ONE_PASS:
            cols = tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (cols < K)[None, :]
            # masked elements read as 0, which changes neither min(·, 0) nor max(·, 0)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(tl.min(x, 1), 0.0) * clip
            hi = tl.maximum(tl.max(x, 1), 0.0) * clip
            scale, zero = _scale_zero(lo, hi, QMIN, QMAX, SYMMETRIC)
            tl.store(q_rows + cols[None, :], _quantize(x, scale[:, None], zero[:, None], QMIN, QMAX),
                     mask=mask)
        else:
            lo, hi = _row_range_looped(x_rows, row_ok, K, BLOCK_M, BLOCK_K)
            scale, zero = _scale_zero(lo * clip, hi * clip, QMIN, QMAX, SYMMETRIC)
            _quantize_looped(x_rows, q_rows, row_ok, K, scale, zero, QMIN, QMAX, BLOCK_K)
        tl.store(s_ptr + rows, scale, mask=row_ok)
        tl.store(z_ptr + rows, zero.to(tl.int32), mask=row_ok)

    @triton.jit
    def _dot(a, b):
        """a·b with fp32 accumulation; fp32 operands as exact IEEE products (not TF32), others in
        their own dtype on the tensor cores (the IEEE flag is only ever given to fp32)."""
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _row_tile(A: tl.constexpr, A_PAD: tl.constexpr, B: tl.constexpr):
        """Offsets of a row's [A_PAD, B] row-major tile and the mask of its A real rows."""
        ia = tl.arange(0, A_PAD)
        ib = tl.arange(0, B)
        return ia[:, None] * B + ib[None, :], (ia < A)[:, None]

    @triton.jit
    def _rotate_row(row_ptr, ha_ptr, hb_ptr, offs, mask, scale_a, scale_b, A_PAD: tl.constexpr,
                    B: tl.constexpr):
        """H_a·X·H_b/√n for one row's tile X, in X's dtype (the products accumulate in fp32)."""
        x = tl.load(row_ptr + offs, mask=mask, other=0.0)
        ia = tl.arange(0, A_PAD)
        ib = tl.arange(0, B)
        hb = tl.load(hb_ptr + ib[:, None] * B + ib[None, :])
        ha = tl.load(ha_ptr + ia[:, None] * A_PAD + ia[None, :])
        # T scaled by 1/√b before it is rounded to x's dtype: fp16 would overflow at |x|·√b
        t = (_dot(x, hb) * scale_b).to(x.dtype)
        return (_dot(ha, t) * scale_a).to(x.dtype)

    @triton.jit
    def _hadamard_kernel(x_ptr, y_ptr, ha_ptr, hb_ptr, scale_a, scale_b, A: tl.constexpr,
                         A_PAD: tl.constexpr, B: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * (A * B)
        offs, mask = _row_tile(A, A_PAD, B)
        y = _rotate_row(x_ptr + row, ha_ptr, hb_ptr, offs, mask, scale_a, scale_b, A_PAD, B)
        tl.store(y_ptr + row + offs, y, mask=mask)

    @triton.jit
    def _hadamard_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, ha_ptr, hb_ptr, scale_a, scale_b, clip,
                               A: tl.constexpr, A_PAD: tl.constexpr, B: tl.constexpr,
                               QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr):
        pid = tl.program_id(0)
        row = pid.to(tl.int64) * (A * B)
        offs, mask = _row_tile(A, A_PAD, B)
        y = _rotate_row(x_ptr + row, ha_ptr, hb_ptr, offs, mask, scale_a, scale_b, A_PAD, B)
        y = y.to(tl.float32)  # padded rows are 0 (H_a's padded rows are): harmless to min/max
        scale, zero = _scale_zero(tl.minimum(tl.min(y), 0.0) * clip, tl.maximum(tl.max(y), 0.0) * clip,
                                  QMIN, QMAX, SYMMETRIC)
        tl.store(q_ptr + row + offs, _quantize(y, scale, zero, QMIN, QMAX), mask=mask)
        tl.store(s_ptr + pid, scale)
        tl.store(z_ptr + pid, zero.to(tl.int32))


    @triton.jit
    def _static_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, n, QMIN: tl.constexpr, QMAX: tl.constexpr,
                             SHIFT: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK: tl.constexpr):
        """clamp(round(x / s) + z, qmin, qmax) − SHIFT over a flat tensor, s and z read from memory."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr)
        if HAS_ZERO:
            zero = tl.load(z_ptr).to(tl.float32) - SHIFT
        else:
            zero = tl.zeros_like(scale) - SHIFT
        tl.store(q_ptr + offs, _quantize(x, scale, zero, QMIN - SHIFT, QMAX - SHIFT), mask=mask)


# ---- launches and references -----------------------------------------------------------------

def _empty_codes(x: torch.Tensor):
    m = x.shape[0]
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(m, dtype=torch.float32, device=x.device),
            torch.empty(m, dtype=torch.int32, device=x.device))


def _launch_dynamic_quant(x: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0):
    q, scale, zero = _empty_codes(x)
    m, k = x.shape
    one_pass = _next_pow2(k) <= ROW_MAX
    block_k = _next_pow2(k) if one_pass else LOOP_BLOCK
    block_m = max(1, min(MAX_ROWS, PROGRAM_ELEMS // block_k)) if one_pass else 1
    qmin, qmax = signed_range(bits)
    if m:
        _dynamic_quant_kernel[(cdiv(m, block_m),)](
            x, q, scale, zero, m, k, clip, QMIN=qmin, QMAX=qmax, SYMMETRIC=symmetric, BLOCK_M=block_m,
            BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=8 if block_m * block_k > 4096 else 4,  # no FMA:
            # lo·c and hi·c contracted into (hi − lo) would round unlike the reference
            enable_fp_fusion=False)
    return q, scale, zero


def _rotation_args(x: torch.Tensor):
    """The ±1 operands, 1/√a, 1/√b and tile sizes for x's row length."""
    a, b = hadamard_split(x.shape[-1])
    ha, hb = _hadamard_operands(a, b, x.dtype, x.device)
    meta = dict(A=a, A_PAD=ha.shape[0], B=b, num_warps=8 if ha.shape[0] * b > 4096 else 4)
    return (ha, hb, 1.0 / math.sqrt(a), 1.0 / math.sqrt(b)), meta


def _launch_hadamard(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    args, meta = _rotation_args(x)
    if x.shape[0]:
        _hadamard_kernel[(x.shape[0],)](x, y, *args, **meta)
    return y


def _launch_hadamard_quant(x: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0):
    q, scale, zero = _empty_codes(x)
    args, meta = _rotation_args(x)
    qmin, qmax = signed_range(bits)
    if x.shape[0]:
        _hadamard_quant_kernel[(x.shape[0],)](x, q, scale, zero, *args, clip, **meta, QMIN=qmin,
                                              QMAX=qmax, SYMMETRIC=symmetric, enable_fp_fusion=False)
    return q, scale, zero


STATIC_BLOCK = 2048  # elements per program of the per-tensor quantizer


def _launch_static_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int,
                         qmax: int, shift: int) -> torch.Tensor:
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.numel():
        _static_quant_kernel[(cdiv(x.numel(), STATIC_BLOCK),)](
            x, q, scale, scale if zero is None else zero, x.numel(), QMIN=qmin, QMAX=qmax, SHIFT=shift,
            HAS_ZERO=zero is not None, BLOCK=STATIC_BLOCK, enable_fp_fusion=False)
    return q


def _static_quant_reference(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int,
                            qmax: int, shift: int) -> torch.Tensor:
    """``quant.quantize`` per tensor (its dtype: the signed or unsigned one of qmin..qmax), less ``shift``."""
    dtype = _REFERENCE_DTYPES[((qmax - qmin).bit_length(), qmin < 0)]
    q = quantize(x.float(), scale, zero, dtype=dtype, axis=None, group_size=None)
    return (q.to(torch.int16) - shift).to(torch.int8)


def _dynamic_quant_reference(x: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0):
    """``quant.dynamic_quantize`` in the signed form (module docstring)."""
    dtype = _REFERENCE_DTYPES[(bits, symmetric)]
    q, scale, zero = dynamic_quantize(x, dtype=dtype, symmetric=symmetric, clip=clip)
    shift = 0 if symmetric else 1 << (bits - 1)
    return ((q.to(torch.int16) - shift).to(torch.int8), scale.reshape(-1),
            (zero.to(torch.int32) - shift).reshape(-1))


def _rotate_in_kernel(x: torch.Tensor) -> bool:
    # the interpreter's bf16 products are wrong (bf16 held as uint16): reference there
    interpreted_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    return use_triton(x) and hadamard_split(x.shape[-1]) is not None and not interpreted_bf16


# ---- custom ops (on [M, K]) and the public functions (on [..., K]) ----------------------------

_Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q int8, scale fp32, zero int32

@torch.library.custom_op("lowbit::triton_dynamic_quant", mutates_args=())
def _dynamic_quant_op(x: torch.Tensor, bits: int, symmetric: bool, clip: float) -> _Codes:
    if use_triton(x):
        return _launch_dynamic_quant(x, bits, symmetric, clip)
    return _dynamic_quant_reference(x, bits, symmetric, clip)


@torch.library.custom_op("lowbit::triton_static_quant", mutates_args=())
def _static_quant_op(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int,
                     shift: int) -> torch.Tensor:
    if use_triton(x):
        return _launch_static_quant(x, scale, zero, qmin, qmax, shift)
    return _static_quant_reference(x, scale, zero, qmin, qmax, shift)


@_static_quant_op.register_fake
def _(x, scale, zero, qmin, qmax, shift):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


@torch.library.custom_op("lowbit::triton_hadamard", mutates_args=())
def _hadamard_op(x: torch.Tensor) -> torch.Tensor:
    return _launch_hadamard(x) if _rotate_in_kernel(x) else hadamard_transform(x)


@torch.library.custom_op("lowbit::triton_hadamard_quant", mutates_args=())
def _hadamard_quant_op(x: torch.Tensor, bits: int, symmetric: bool, clip: float) -> _Codes:
    if _rotate_in_kernel(x):
        return _launch_hadamard_quant(x, bits, symmetric, clip)
    return _dynamic_quant_reference(hadamard_transform(x), bits, symmetric, clip)


@_dynamic_quant_op.register_fake
def _(x, bits, symmetric, clip):
    return _empty_codes(x)


@_hadamard_op.register_fake
def _(x):
    return torch.empty_like(x)


@_hadamard_quant_op.register_fake
def _(x, bits, symmetric, clip):
    return _empty_codes(x)


def _rows(x: torch.Tensor, bits: int | None = None, rotate: bool = False) -> torch.Tensor:
    """x as contiguous [M, K] rows, after checking what the ops take."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a float32/float16/bfloat16 activation, got {x.dtype}")
    if bits is not None and bits not in (4, 8):
        raise ValueError(f"per-token activation codes are 4 or 8 bits, got {bits}")
    return x.reshape(-1, x.shape[-1]).contiguous()


def dynamic_quant(x: torch.Tensor, bits: int = 8, symmetric: bool = True, clip: float = 1.0):
    """Per-token quantization of x [..., K] to signed ``bits``-bit codes: (q int8 [..., K],
    scale fp32 [...], zero int32 [...]), x ≈ (q − zero)·scale (module docstring); ``clip``
    scales lo and hi first (``quant.dynamic_quantize``'s clip).

    >>> q, s, z = dynamic_quant(torch.randn(4, 64), 8, symmetric=False)
    """
    q, scale, zero = torch.ops.lowbit.triton_dynamic_quant(_rows(x, bits), bits, symmetric, float(clip))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1]), zero.reshape(x.shape[:-1])


def static_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: DType) -> torch.Tensor:
    """Per-tensor quantization with calibrated ``scale`` and ``zero`` (one element each, on x's
    device; ``quant.quantize`` with ``dtype``, int8/int4/uint8/uint4) in one pass, in the signed
    form the integer GEMM takes: unsigned codes come back less 128 (as ``uint8_to_int8``), so
    their zero point is ``zero − 128``. Reads no value on the host (CUDA-graph safe).

    >>> q = static_quant(torch.randn(4, 64), torch.tensor([0.02]), torch.tensor([128]), DType.u8)
    """
    lo, hi = dtype.int_range
    shift = 128 if lo == 0 else 0
    flat = x.reshape(-1).contiguous()
    q = torch.ops.lowbit.triton_static_quant(flat, scale.reshape(1).float(), None if zero is None else zero.reshape(1),
                                             lo, hi, shift)
    return q.reshape(x.shape)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x·H_nᵀ/√n over the last dim, n = m·2^k (``hadamard_transform``), same shape and dtype.

    >>> y = hadamard(torch.randn(4, 768))          # 768 = 12·64
    """
    return torch.ops.lowbit.triton_hadamard(_rows(x, rotate=True)).reshape(x.shape)


def hadamard_quant(x: torch.Tensor, bits: int = 8, symmetric: bool = True, clip: float = 1.0):
    """``dynamic_quant(hadamard(x), bits, symmetric, clip)`` in one kernel.

    >>> q, s, z = hadamard_quant(torch.randn(4, 4096))
    """
    q, scale, zero = torch.ops.lowbit.triton_hadamard_quant(_rows(x, bits, rotate=True), bits, symmetric,
                                                            float(clip))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1]), zero.reshape(x.shape[:-1])
