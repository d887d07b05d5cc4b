"""The GEMM kernels of the triton backend against their torch references and exact integer math.

Kernels run on the CPU in Triton's interpreter (shapes kept small) and on a CUDA GPU when there
is one. Tolerances:

* int8 ``scaled_mm``: the integer sum must be exact; the fp32 epilogue may differ from the
  reference by a fused multiply-add (≤ 2 fp32 ulps, checked at 1e-6 relative); fp16/bf16 outputs
  by one rounding of the output type.
* fp8 ``scaled_mm`` (GPU only: the interpreter's fp8 arithmetic is wrong): the reference sums the
  fp8 products exactly; the tensor cores accumulate each 128-long K-tile with a shortened mantissa
  before adding it in fp32, so 1e-2 relative (Frobenius) error is allowed.
* w4a16: both sides dequantize identically; they differ in summation order (and, on a GPU, fp32
  products via 3-pass TF32): 1e-5 relative for fp32 activations, 1e-2 for fp16 (fp16 products,
  fp32 sums), 2e-2 for bf16.
"""

import pytest
import torch
from conftest import kernel_devices, rel_err

from lowbit.backends.triton.gemm import (scaled_mm, scaled_mm_reference, uint8_to_int8,
                                         weight_sums)
from lowbit.backends.triton.w4a16 import (dequantize_int4, pack_int4, unpack_int4, w4a16_linear,
                                          w4a16_mm, w4a16_reference)

# M, N, K: one tile; edges in every dimension (not multiples of the tiles); several tiles in M
# and N with a partial group of tile rows (interpreter tiles are 16×32×32, GROUP_M = 2)
SHAPES = [(1, 16, 32), (5, 24, 40), (40, 64, 96)]


def _int8(*shape, gen):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


def _operands(m, n, k, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b = _int8(m, k, gen=gen), _int8(n, k, gen=gen)
    sa, sb = torch.rand(m, generator=gen) + 0.5, torch.rand(n, generator=gen) * 1e-2 + 1e-3
    return [t.to(device) for t in (a, b, sa, sb)]


def _exact_dot(a, b):
    """Σ_k a[m, k]·b[n, k] in int64 on the CPU: the sum the kernel must reproduce bit for bit."""
    return a.cpu().long() @ b.cpu().long().T


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_sum_is_exact(device, m, n, k):
    a, b, _, _ = _operands(m, n, k, device)
    ones_m, ones_n = torch.ones(m, device=device), torch.ones(n, device=device)
    y = scaled_mm(a, b, ones_m, ones_n, out_dtype=torch.float32)
    # |sum| ≤ 128²·96 < 2²⁴: every integer is an fp32, so equality is the test
    assert torch.equal(y.cpu(), _exact_dot(a, b).float())


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("scales", ["token-channel", "tensor-tensor", "token-tensor"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_epilogue(device, scales, with_bias):
    m, n, k = 5, 24, 40
    a, b, sa, sb = _operands(m, n, k, device, seed=1)
    if scales.startswith("tensor"):
        sa = sa[:1]
    if scales.endswith("tensor"):
        sb = sb[:1]
    bias = torch.randn(n, device=device) if with_bias else None
    y = scaled_mm(a, b, sa, sb, bias, out_dtype=torch.float32)
    ref = scaled_mm_reference(a, b, sa, sb, bias, out_dtype=torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # and the reference is the documented formula
    expect = _exact_dot(a, b).double() * sa.cpu().double().view(-1, 1) * sb.cpu().double().view(1, -1)
    if bias is not None:
        expect += bias.cpu().double()
    torch.testing.assert_close(ref.cpu().double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("per_token_zero", [False, True])
def test_int8_zero_point(device, per_token_zero):
    m, n, k = 40, 64, 96
    a, b, sa, sb = _operands(m, n, k, device, seed=2)
    gen = torch.Generator().manual_seed(3)
    za = torch.randint(-128, 128, (m if per_token_zero else 1,), generator=gen, dtype=torch.int32).to(device)
    bias = torch.randn(n, device=device)
    y = scaled_mm(a, b, sa, sb, bias, za, weight_sums(b), out_dtype=torch.float32)
    ref = scaled_mm_reference(a, b, sa, sb, bias, za, weight_sums(b), out_dtype=torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # the rank-1 correction equals subtracting the zero point inside the sum: Σ (a − z)·b
    centered = (a.cpu().long() - za.cpu().long().view(-1, 1)) @ b.cpu().long().T
    ones_m, ones_n = torch.ones(m, device=device), torch.ones(n, device=device)
    y_int = scaled_mm(a, b, ones_m, ones_n, None, za, weight_sums(b), out_dtype=torch.float32)
    assert torch.equal(y_int.cpu(), centered.float())  # |sum| ≤ 255·128·96 < 2²⁴


@pytest.mark.parametrize("device", kernel_devices())
def test_uint8_activations_shift_exactly(device):
    """s_a·(q − z) with uint8 q equals the int8 form (q − 128, z − 128) through the kernel."""
    m, n, k = 5, 24, 64
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8)
    z, sa = torch.tensor([131]), torch.tensor([0.02])
    b = _int8(n, k, gen=gen)
    sb = torch.rand(n, generator=gen) * 1e-2
    a8, za = uint8_to_int8(q, z)
    assert torch.equal(a8.to(torch.int16) + 128, q.to(torch.int16)) and za.tolist() == [3]
    y = scaled_mm(*(t.to(device) for t in (a8, b, sa, sb)), None, za.to(device),
                  weight_sums(b).to(device), out_dtype=torch.float32)
    x = (q.double() - z.double()) * sa.double()  # dequantize, then a float matmul
    expect = x @ (b.double() * sb.double().view(-1, 1)).T
    torch.testing.assert_close(y.cpu().double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_int8_half_output(device, out_dtype):
    if device == "cpu" and out_dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in Triton's interpreter")
    a, b, sa, sb = _operands(40, 64, 96, device, seed=5)
    bias = torch.randn(64, device=device)
    y = scaled_mm(a, b, sa, sb, bias, out_dtype=out_dtype)
    ref = scaled_mm_reference(a, b, sa, sb, bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    eps = torch.finfo(out_dtype).eps  # one rounding of the output: half an ulp, twice for ties
    torch.testing.assert_close(y.float(), ref.float(), rtol=eps, atol=1e-5)


@pytest.mark.parametrize("device", kernel_devices())
def test_fp8(device):
    if device == "cpu":
        pytest.skip("fp8 arithmetic is wrong in Triton's interpreter; tested on CUDA only")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 tensor cores need sm_89 or newer")
    gen = torch.Generator().manual_seed(6)
    m, n, k = 33, 96, 512
    a = (torch.randn(m, k, generator=gen) * 50).to(torch.float8_e4m3fn).to(device)
    b = (torch.randn(n, k, generator=gen) * 50).to(torch.float8_e4m3fn).to(device)
    sa, sb = torch.rand(m, device=device) + 0.5, torch.rand(n, device=device) * 1e-3
    bias = torch.randn(n, device=device)
    y = scaled_mm(a, b, sa, sb, bias, out_dtype=torch.float32)
    ref = scaled_mm_reference(a, b, sa, sb, bias, out_dtype=torch.float32)
    assert rel_err(y, ref) < 1e-2


# ---- w4a16 ----------------------------------------------------------------------------------

def _int4_weight(n, k, group_size, with_zero, seed=0):
    """Codes, scale and zero point as a quantizer gives them: signed codes without a zero point,
    unsigned codes in [0, 15] with one."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (0, 16) if with_zero else (-8, 8)
    q = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
    shape = (n,) if group_size is None else (n, k // group_size)
    scale = torch.rand(shape, generator=gen) * 0.1 + 0.01
    zero = torch.randint(0, 16, shape, generator=gen).float() if with_zero else None
    return q, scale, zero


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("with_zero", [False, True])
def test_pack_unpack_round_trip(group_size, with_zero):
    q, scale, zero = _int4_weight(48, 256, group_size, with_zero)
    packed = pack_int4(q, scale, zero, group_size)
    assert packed.qweight.dtype == torch.uint8 and packed.qweight.shape == (48, 128)
    assert torch.equal(unpack_int4(packed), q)
    # the dequantized weight is (q − z)·s with each scale spread over its group
    g = group_size or 256
    s = scale.reshape(48, -1).repeat_interleave(g, 1)
    z = 0 if zero is None else zero.reshape(48, -1).repeat_interleave(g, 1)
    w = dequantize_int4(packed.qweight, packed.scales, packed.zeros, group_size or 0)
    assert torch.equal(w, (q.float() - z) * s)


def test_pack_layout_and_signed_codes_with_zero_point():
    # byte j of a 32-chunk: low nibble k = j, high nibble k = j + 16 (codes stored as q + 8)
    q = torch.arange(-8, 8).repeat(2).reshape(1, 32)
    packed = pack_int4(q, torch.ones(1))
    u = q[0] + 8
    assert packed.qweight[0].tolist() == (u[:16] | (u[16:] << 4)).tolist()
    # lowbit's int4/asym: signed codes with a signed zero point; both shift by 8
    zq = torch.tensor([-3.0])
    packed = pack_int4(q, torch.ones(1), zq)
    assert packed.signed and torch.equal(unpack_int4(packed), q.to(torch.int8))
    w = dequantize_int4(packed.qweight, packed.scales, packed.zeros, 0)
    assert torch.equal(w[0], q[0].float() + 3)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype_tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("with_zero", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_w4a16_matches_reference(device, dtype_tol, group_size, with_zero, m):
    dtype, tol = dtype_tol
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in Triton's interpreter")
    n, k = 48, 256
    q, scale, zero = _int4_weight(n, k, group_size, with_zero, seed=m)
    packed = pack_int4(q, scale, zero, group_size).to(device)
    gen = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype)
    y = w4a16_mm(x, packed.qweight, packed.scales, packed.zeros, group_size or 0, bias)
    ref = w4a16_reference(x, packed.qweight, packed.scales, packed.zeros, group_size or 0, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < tol
    # and against float64 math on the original codes (catches a layout bug both sides share)
    g = group_size or k
    w = (q.double() - (0 if zero is None else zero.double().repeat_interleave(g, -1).reshape(n, -1))) \
        * scale.double().reshape(n, -1).repeat_interleave(g, 1)
    assert rel_err(y, x.cpu().double() @ w.T + bias.cpu().double()) < tol


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("m", [1, 17])
def test_w4a16_partial_k_tile(device, m):
    """Per channel, K = 160 ends in a partial K-tile (interpreter tiles are 64 long), with and
    without split K."""
    q, scale, _ = _int4_weight(24, 160, None, False, seed=8)
    packed = pack_int4(q, scale).to(device)
    x = torch.randn(m, 160).to(device)
    y = w4a16_mm(x, packed.qweight, packed.scales, None, 0, None)
    w = (q.double() * scale.double().view(-1, 1)).to(device)
    assert rel_err(y, x.double() @ w.T) < 1e-5


@pytest.mark.parametrize("device", kernel_devices())
def test_w4a16_linear_batch_dims(device):
    q, scale, zero = _int4_weight(40, 96, 32, True, seed=7)
    packed = pack_int4(q, scale, zero, 32).to(device)
    x = torch.randn(2, 3, 96).to(device)
    y = w4a16_linear(x, packed)
    w = dequantize_int4(packed.qweight, packed.scales, packed.zeros, 32)
    assert y.shape == (2, 3, 40)
    assert rel_err(y, x @ w.T) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_gpu_tile_tables(m):
    """Each row of the GPU tile tables (M ≤ 16, 64, 256, more), with split K for small M."""
    n, k = 256, 4096
    a, b, sa, sb = _operands(m, n, k, "cuda", seed=9)
    za = torch.full((m,), 5, dtype=torch.int32, device="cuda")
    args = (a, b, sa, sb, torch.randn(n, device="cuda"), za, weight_sums(b))
    y = scaled_mm(*args, out_dtype=torch.float32)
    torch.testing.assert_close(y, scaled_mm_reference(*args, out_dtype=torch.float32), rtol=1e-6, atol=1e-5)
    q, scale, zero = _int4_weight(n, k, 128, True, seed=m)
    p = pack_int4(q, scale, zero, 128).to("cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w4 = (x, p.qweight, p.scales, p.zeros, 128, None)
    assert rel_err(w4a16_mm(*w4), w4a16_reference(*w4)) < 1e-2


# ---- errors, schema, compile ------------------------------------------------------------------

def test_scaled_mm_errors():
    a, b = torch.zeros(4, 32, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.int8)
    s4, s8 = torch.ones(4), torch.ones(8)
    with pytest.raises(ValueError, match="must both be int8 or both float8"):
        scaled_mm(a, b.float(), s4, s8)
    with pytest.raises(ValueError, match="K mismatch"):
        scaled_mm(a, b[:, :16], s4, s8)
    with pytest.raises(ValueError, match="b_scale must be 1-D with 1 or 8"):
        scaled_mm(a, b, s4, torch.ones(3))
    with pytest.raises(ValueError, match="needs int8 inputs and b_sum"):
        scaled_mm(a, b, s4, s8, a_zero=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="out_dtype"):
        scaled_mm(a, b, s4, s8, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="must be uint8"):
        uint8_to_int8(a, torch.zeros(1))
    with pytest.raises(ValueError, match="a_scale is on meta, a is on cpu"):
        scaled_mm(a, b, s4.to("meta"), s8)


def test_w4a16_errors():
    q, scale, _ = _int4_weight(8, 64, 32, False)
    with pytest.raises(ValueError, match=r"K = 48 \(q is \(8, 48\)\) is not a multiple of 32"):
        pack_int4(q[:, :48], scale[:, :1], None, 32)
    with pytest.raises(ValueError, match="group size 128 must be a positive multiple of 32 dividing K = 64"):
        pack_int4(q, scale, None, 128)
    with pytest.raises(ValueError, match=r"scale must be \[8, 2\]"):
        pack_int4(q, scale[:, :1], None, 32)
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\]"):
        pack_int4(q + 8, scale, None, 32)
    packed = pack_int4(q, scale, None, 32)
    args = (packed.qweight, packed.scales, None, 32, None)
    with pytest.raises(ValueError, match="K mismatch"):
        w4a16_mm(torch.randn(2, 32), *args)
    with pytest.raises(ValueError, match="x must be a float16/bfloat16/float32"):
        w4a16_mm(torch.zeros(2, 64, dtype=torch.int8), *args)
    with pytest.raises(ValueError, match=r"scales must be float \[2, 8\]"):
        w4a16_mm(torch.randn(2, 64), packed.qweight, packed.scales.T, None, 32, None)
    with pytest.raises(ValueError, match="scales is on meta, x is on cpu"):
        w4a16_mm(torch.randn(2, 64), packed.qweight, packed.scales.to("meta"), None, 32, None)


def _sample_calls(device):
    a, b, sa, sb = _operands(5, 24, 64, device)
    za = torch.tensor([3], dtype=torch.int32, device=device)
    q, scale, zero = _int4_weight(24, 64, 32, True)
    p = pack_int4(q, scale, zero, 32).to(device)
    x = torch.randn(3, 64, device=device)
    bias = torch.randn(24, device=device)
    return [(torch.ops.lowbit.scaled_mm.default, (a, b, sa, sb, None, za, weight_sums(b), torch.float32)),
            (torch.ops.lowbit.w4a16_mm.default, (x, p.qweight, p.scales, p.zeros, 32, bias))]


def test_opcheck_reference(monkeypatch):
    """Schema and fake (meta) implementations agree with the torch references (no triton needed)."""
    monkeypatch.setenv("LOWBIT_TRITON", "reference")
    for op, args in _sample_calls("cpu"):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", kernel_devices())
def test_opcheck_kernel(device):
    """... and with the kernels (output shape, dtype and strides as the fake ones say)."""
    for op, args in _sample_calls(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph(monkeypatch):
    """torch.compile traces through both ops (fake implementations, no graph break)."""
    monkeypatch.setenv("LOWBIT_TRITON", "reference")
    (_, mm_args), (_, w4_args) = _sample_calls("cpu")

    def f(mm_args, w4_args):
        return scaled_mm(*mm_args[:-1], out_dtype=torch.float32).sum() + w4a16_mm(*w4_args).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(mm_args, w4_args), f(mm_args, w4_args))


# ---- ahead-of-time compilation for the H100 (no GPU needed) ------------------------------------

def _compile_sm90(fn, types: dict, consts: dict, cfg) -> str:
    """Compile a kernel for sm_90 the way the JIT would on an H100 (ints equal to 1 become
    constants; pointers, N, K and strides are marked divisible by 16), returning its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    consts = {**consts, **{n: 1 for n in ("stride_ak", "stride_bk", "stride_cn", "stride_xk") if n in names}}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in consts
             and (signature[n].startswith("*") or n in ("N", "K") or n.startswith("stride"))}
    kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return kernel.asm["ptx"]


def _compile_all_sm90() -> None:
    """Every GPU tile configuration of both kernels (run in a process without the interpreter)."""
    from lowbit.backends.triton import gemm, w4a16

    ptrs = dict(sa_ptr="*fp32", sb_ptr="*fp32", bias_ptr="*fp32", za_ptr="*i32", bsum_ptr="*i32")
    for _, cfg in gemm.GPU_CONFIGS:
        for dt in ("i8", "fp8e4nv"):
            consts = dict(SA_STRIDE=1, SB_STRIDE=1, ZA_STRIDE=1, HAS_BIAS=True, HAS_ZERO=dt == "i8",
                          IS_INT=dt == "i8", MAX_IMPRECISE_ACC=None if dt == "i8" else cfg.block_k,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
            types = dict(ptrs, a_ptr=f"*{dt}", b_ptr=f"*{dt}", c_ptr="*bf16")
            assert "mma" in _compile_sm90(gemm._scaled_mm_kernel, types, consts, cfg)  # tensor cores
    for _, wc in w4a16.GPU_CONFIGS:
        t = wc.tile
        for dt, group in (("fp16", 128), ("bf16", 32), ("fp32", 0)):
            consts = dict(GROUP=group, HAS_ZERO=True, HAS_BIAS=True, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                          BLOCK_K=min(t.block_k, group or t.block_k), GROUP_M=t.group_m)
            types = dict(x_ptr=f"*{dt}", w_ptr="*u8", s_ptr="*fp32", z_ptr="*fp32", bias_ptr=f"*{dt}",
                         out_ptr="*fp32" if wc.programs_per_sm else f"*{dt}")
            assert "mma" in _compile_sm90(w4a16._w4a16_kernel, types, consts, t)
    _compile_sm90(w4a16._sum_splits_kernel, dict(part_ptr="*fp32", bias_ptr="*fp16", out_ptr="*fp16"),
                  dict(SPLITS=8, HAS_BIAS=True, BLOCK=1024), gemm.MMConfig(0, 0, 0, num_stages=1))
    from lowbit.backends.triton import quantize as tq

    for dt, zero in (("fp32", True), ("fp16", False), ("bf16", True)):  # the per-tensor activation quantizer
        _compile_sm90(tq._static_quant_kernel, dict(x_ptr=f"*{dt}", q_ptr="*i8", s_ptr="*fp32", z_ptr="*u8"),
                      dict(QMIN=0, QMAX=255, SHIFT=128, HAS_ZERO=zero, BLOCK=tq.STATIC_BLOCK),
                      gemm.MMConfig(0, 0, 0, num_stages=1))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels instead")
def test_kernels_compile_for_h100():
    """The interpreter never runs Triton's compiler: compile all GPU configurations for sm_90
    (PTX and cubin via the bundled ptxas) in a process where the kernels are not interpreted."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, [os.path.dirname(here), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    code = "import test_triton_gemm as t; t._compile_all_sm90()"
    done = subprocess.run([sys.executable, "-c", code], cwd=here, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
