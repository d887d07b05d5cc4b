"""The activation kernels (lowbit/backends/triton/quantize.py) against lowbit's references:
per-token quantization bit for bit, the Hadamard rotation within the documented tolerance,
and the fused rotate-then-quantize as the quantized kernel rotation exactly."""

import pytest
import torch
from conftest import kernel_devices, rel_err

from lowbit.backends.triton import quantize as tq
from lowbit.ir.dialects.hadamard import hadamard_transform
from lowbit.ir.dialects.quant import EPS, dynamic_quantize, quantize
from lowbit.ir.types import DType

DEVICES = kernel_devices()
MODES = [(8, True), (8, False), (4, True), (4, False)]
HADAMARD_SIZES = [16, 64, 256, 768, 1024, 1280, 4096]  # 768 = 12·64, 1280 = 20·64


def expected(x: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0):
    """``quant.dynamic_quantize`` in the signed form: the signed dtype when symmetric, the
    unsigned one (lowbit's asymmetric activations) shifted by 2^(bits−1) otherwise."""
    dtype = {(8, True): DType.i8, (4, True): DType.i4, (8, False): DType.u8, (4, False): DType.u4}
    q, s, z = dynamic_quantize(x.cpu(), dtype=dtype[(bits, symmetric)], symmetric=symmetric, clip=clip)
    shift = 0 if symmetric else 1 << (bits - 1)
    lead = x.shape[:-1]
    return q.int() - shift, s.reshape(lead), (z.int() - shift).reshape(lead)


def assert_same_codes(got, want):
    q, s, z = (t.cpu() for t in got)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and z.dtype == torch.int32
    assert torch.equal(s, want[1]), f"scales differ in {(s != want[1]).sum()} rows"
    assert torch.equal(z, want[2]), "zero points differ"
    assert torch.equal(q.int(), want[0]), f"codes differ at {(q.int() != want[0]).sum()} elements"


def rows(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Normal rows with magnitudes from 1e-3 to 1e3, a few shifted (asymmetric ranges)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m)[:, None]
    return x + torch.where(torch.arange(m) % 3 == 0, 2.0, 0.0)[:, None] * x.abs().amax(1, keepdim=True)


# ---- dynamic_quant: bit for bit ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,symmetric", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dynamic_quant_exact(device, bits, symmetric, dtype):
    x = rows(19, 100).to(dtype)  # 19 rows: a partial block of rows per program; K masked
    assert_same_codes(tq.dynamic_quant(x.to(device), bits, symmetric), expected(x, bits, symmetric))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,symmetric", MODES)
def test_dynamic_quant_clipped_exact(device, bits, symmetric):
    """A clip ratio (each token's range shrunk, the values beyond it saturating) is the
    reference's bit for bit, in the one-pass, two-pass and fused-rotation kernels."""
    for x in (rows(19, 100), rows(3, 20000, seed=1)):  # 20000 > ROW_MAX: the row is read twice
        got = tq.dynamic_quant(x.to(device), bits, symmetric, 0.85)
        want = expected(x, bits, symmetric, 0.85)
        assert_same_codes(got, want)
        assert not torch.equal(want[1], expected(x, bits, symmetric)[1])  # the clip changed the scales
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        assert ((want[0] == qmin) | (want[0] == qmax)).any()  # and values saturate
    x = rows(6, 768, seed=4).to(device)
    fused = tq.hadamard_quant(x, bits, symmetric, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(fused, tq.dynamic_quant(tq.hadamard(x), bits, symmetric, 0.9)))


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's 3e38 − (−3e38)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,symmetric", MODES)
def test_dynamic_quant_edge_rows(device, bits, symmetric):
    qmax = (1 << (bits - 1)) - 1
    x = torch.zeros(6, 8)
    x[1] = torch.tensor([qmax, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -3.5])  # scale 1: exact .5 ties
    x[2] = torch.tensor([3e38, -3e38, 1.0, -1.0, 0.0, 2e38, -1e-3, 7.0])  # hi − lo overflows
    x[3] = torch.tensor([1e-30, -1e-40, 3e-39, 0.0, 1e-35, -1e-30, 0.0, 0.0])  # scale EPS
    x[4] = torch.tensor([1e4, 1.0, -1.0, 0.25, 0.0, 5e3, 2.5e3, -7.0])  # one outlier
    x[5] = torch.tensor([-5.0, -4.0, -3.0, -2.0, -1.0, -0.5, -0.25, -0.125])  # all negative
    got = tq.dynamic_quant(x.to(device), bits, symmetric)
    assert_same_codes(got, expected(x, bits, symmetric))
    q, s, z = (t.cpu() for t in got)
    assert s[0] == torch.tensor(EPS, dtype=torch.float32) and (q[0].int() == z[0]).all()  # x̂ = 0
    if symmetric:
        assert q[1].tolist() == [qmax, 0, 2, 2, 0, -2, 4, -4]  # half to even
        # all negative: below 8 bits min x is qmin (every code used); int8 maps max|x| to −127
        low = -qmax - 1 if bits < 8 else -qmax
        assert q[5, 0] == low and s[5] == 5.0 / -low


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_quant_long_rows(device, symmetric):
    x = rows(3, tq.ROW_MAX + 617, seed=1)  # past ROW_MAX: two passes over chunks of the row
    assert_same_codes(tq.dynamic_quant(x.to(device), 8, symmetric), expected(x, 8, symmetric))


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_quant_signed_reference(device):
    """Asymmetric codes are the unsigned reference shifted; on data without near-ties that is
    also the signed reference. Near a tie the signed one rounds qmin − lo/s in fp32 and differs."""
    x = rows(7, 48, seed=2)
    for bits, dtype in ((8, DType.i8), (4, DType.i4)):
        q, s, z = dynamic_quantize(x, dtype=dtype, symmetric=False)
        want = q.int(), s.reshape(-1), z.int().reshape(-1)
        assert_same_codes(tq.dynamic_quant(x.to(device), bits, False), want)
    tie = torch.tensor([[-1.0, 508.99612]])  # −lo/s = 0.5 + 2^-24: −128 + that rounds to −127.5
    _, _, z_signed = dynamic_quantize(tie, dtype=DType.i8, symmetric=False)
    got = tq.dynamic_quant(tie.to(device), 8, False)
    assert_same_codes(got, expected(tie, 8, False))
    assert got[2].item() == -127 and z_signed.item() == -128


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_quant_shapes(device):
    q, s, z = tq.dynamic_quant(torch.randn(2, 3, 40, device=device))
    assert q.shape == (2, 3, 40) and s.shape == z.shape == (2, 3) and not z.any()
    q, s, z = tq.dynamic_quant(torch.randn(0, 40, device=device), 8, False)
    assert q.shape == (0, 40) and s.shape == (0,)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        tq.dynamic_quant(torch.randn(2, 8, device=device), 6)
    with pytest.raises(TypeError, match="float"):
        tq.dynamic_quant(torch.ones(2, 8, dtype=torch.int32, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_reference_path_matches_kernels(device, monkeypatch):
    """LOWBIT_TRITON=reference runs the torch references: the same codes, the same rotation."""
    x = rows(5, 256, seed=3).to(device)
    kernel = tq.dynamic_quant(x, 8, False), tq.hadamard(x), tq.hadamard_quant(x, 4, True)
    monkeypatch.setenv("LOWBIT_TRITON", "reference")
    ref = tq.dynamic_quant(x, 8, False), tq.hadamard(x), tq.hadamard_quant(x, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(kernel[0], ref[0]))
    assert rel_err(kernel[1], ref[1]) < 1e-6
    assert torch.equal(kernel[2][0], ref[2][0]) and torch.allclose(kernel[2][1], ref[2][1], rtol=1e-6)


# ---- hadamard: the rotation ----------------------------------------------------------------

def test_hadamard_split():
    assert [tq.hadamard_split(n) for n in (16, 768, 1280, 4096, 8192, 14336)] == [
        (1, 16), (24, 32), (20, 64), (64, 64), (64, 128), (112, 128)]
    assert tq.hadamard_split(12) is None and tq.hadamard_split(2240) is None  # b < 16; 140 pads past 128
    assert tq.hadamard_split(32768) is None and tq.hadamard_split(11008) is None  # too long; no base
    for n in (16 * m * 2 ** k for m in (1, 12, 20, 28, 36, 52, 60, 108) for k in range(4)):
        a, b = tq.hadamard_split(n) or (n, 0)
        assert a * b == n and 16 <= b <= 128 and tq._next_pow2(max(a, 16)) <= 128, n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", HADAMARD_SIZES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_hadamard_matches_transform(device, n, dtype, tol):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    exact = hadamard_transform(x.double())
    y = tq.hadamard(x.to(device, dtype))
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y.cpu(), exact) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [12, 2240, 11008, 172])
def test_hadamard_fallback_sizes(device, n):
    x = torch.randn(3, n, device=device)
    assert torch.equal(tq.hadamard(x), hadamard_transform(x))
    assert_same_codes(tq.hadamard_quant(x, 8, False), expected(hadamard_transform(x), 8, False))


def test_no_kernel_split_for_an_orthogonal_substitute():
    assert tq.hadamard_split(172 * 16) is None  # R_43 ⊗ H_64: not ±1, not exact in half precision


# ---- hadamard_quant: rotate and quantize in one kernel --------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False)])
def test_hadamard_quant_is_quantized_rotation(device, dtype, bits, symmetric):
    """Fused = quantize(the kernel's rotation, rounded to x's dtype), bit for bit."""
    x = rows(6, 768, seed=4).to(device, dtype)
    fused = tq.hadamard_quant(x, bits, symmetric)
    unfused = tq.dynamic_quant(tq.hadamard(x), bits, symmetric)
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused))


def assert_close_codes(got, want, scale_rtol: float, max_fraction: float):
    """Scales within ``scale_rtol``; zero points differing by at most 1, and the codes relative
    to them (q − z, what dequantization sees) by at most 1, on at most ``max_fraction`` of the
    elements (values the rotations' rounding puts across a tie)."""
    q, s, z = (t.cpu() for t in got)
    assert ((s - want[1]).abs() / want[1]).max() <= scale_rtol
    assert (z - want[2]).abs().max() <= 1
    dq = ((q.int() - z.int()[..., None]) - (want[0].int() - want[2].int()[..., None])).abs()
    assert dq.max() <= 1 and (dq > 0).float().mean() <= max_fraction


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [64, 768, 1280, 4096])
@pytest.mark.parametrize("bits,symmetric", MODES)
def test_hadamard_quant_fp32(device, n, bits, symmetric):
    x = rows(5, n, seed=n)
    got = tq.hadamard_quant(x.to(device), bits, symmetric)
    assert_close_codes(got, expected(hadamard_transform(x), bits, symmetric), 1e-5, 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [256, 1280, 4096])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False)])
def test_hadamard_quant_fp16(device, n, bits, symmetric):
    """fp16: the kernel and the reference round the rotation differently (each ≲ 1e-3 relative),
    so scales agree to 2e-3 and ≈ 1-2% of the codes sit on the other side of a tie. Rows up to
    ~30: the reference's fp16 butterfly overflows past |x|·√n ≈ 65504 (see the next test)."""
    x = (rows(5, n, seed=n) / 100).half()
    got = tq.hadamard_quant(x.to(device), bits, symmetric)
    assert_close_codes(got, expected(hadamard_transform(x), bits, symmetric), 2e-3, 0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_fp16_large_rows(device):
    """The kernel scales X·H_b by 1/√b before rounding to fp16 and the reference computes half
    inputs in fp32, so rows whose unnormalized butterfly sums exceed fp16 stay finite in both."""
    x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(5)) * 3000
    assert (x.abs().amax() * 64 > torch.finfo(torch.float16).max).item()
    assert rel_err(hadamard_transform(x.half()), hadamard_transform(x.double())) <= 1e-3
    assert rel_err(tq.hadamard(x.half().to(device)).cpu(), hadamard_transform(x.double())) <= 1e-3
    q, s, _ = tq.hadamard_quant(x.half().to(device))
    assert s.isfinite().all() and rel_err(q.cpu().float() * s.cpu()[:, None], hadamard_transform(x)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the interpreter's bf16 is wrong)")
@pytest.mark.parametrize("n", [768, 4096, 8192])
def test_bf16_on_gpu(n):
    x = torch.randn(9, n, generator=torch.Generator().manual_seed(0))
    assert rel_err(tq.hadamard(x.bfloat16().cuda()).cpu(), hadamard_transform(x.double())) <= 8e-3
    fused = tq.hadamard_quant(x.bfloat16().cuda(), 8, False)
    unfused = tq.dynamic_quant(tq.hadamard(x.bfloat16().cuda()), 8, False)
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused))


# ---- the custom ops' schemas and fake tensors ------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(3, 64, device=device)
    torch.library.opcheck(torch.ops.lowbit.triton_dynamic_quant.default, (x, 8, False, 1.0))
    torch.library.opcheck(torch.ops.lowbit.triton_hadamard.default, (x,))
    torch.library.opcheck(torch.ops.lowbit.triton_hadamard_quant.default, (x.half(), 4, True, 0.9))


# ---- static_quant: per-tensor, bit for bit -------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,zero", [(DType.i8, None), (DType.i8, 3), (DType.u8, 131), (DType.u8, None),
                                        (DType.i4, None), (DType.u4, 7)])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16])
def test_static_quant_exact(device, dtype, zero, xdtype):
    """``quant.quantize`` per tensor, then the signed form (unsigned codes less 128), in one kernel:
    ties at k + ½ steps (fp32), saturation at both ends, a length no block divides."""
    scale = torch.tensor([0.0371])
    x = (rows(7, 333, seed=2) / 50).to(xdtype)
    x.view(-1)[:40] = (torch.arange(40) - 20.5) * scale  # in fp32, most are exact ties after the division
    z = None if zero is None else torch.tensor([zero], dtype=dtype.storage)
    want = quantize(x.float(), scale, z, dtype=dtype, axis=None, group_size=None).to(torch.int16)
    want = want - (128 if dtype in (DType.u8, DType.u4) else 0)
    got = tq.static_quant(x.to(device), scale.to(device), None if z is None else z.to(device), dtype)
    assert got.dtype == torch.int8 and got.shape == x.shape
    assert torch.equal(got.cpu().to(torch.int16), want)
    lo, hi = dtype.int_range
    assert (want == lo - (128 if lo == 0 else 0)).any() and (want == hi - (128 if lo == 0 else 0)).any()
