"""Block-sparse flash attention (lowbit/backends/triton/attention.py) against its torch reference.

On the CPU the kernel runs in Triton's interpreter, where fp32 and fp16 dots are exact enough
to compare; bf16 is compared only on a GPU. Shapes are kept small for the interpreter, but they
cover every code path of the GPU tiling: block 16/32 (tile = block), 64 (a 128-row tile over two
mask query blocks), 128 (two 64-key tiles per mask block), sequence tails and Lq ≠ Lk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_devices

from lowbit.backends.triton import attention as attn
from lowbit.backends.triton.attention import (
    block_indices,
    block_sparse_attention,
    block_sparse_attention_indexed,
    block_sparse_attention_reference,
    causal_block_mask,
    kernel_block_indices,
    tile_config,
)
from lowbit.ir.opdef import lookup

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (block, B, Hq, Hkv, Lq, Lk, D): each row reaches a different tiling / masking path.
CASES = [
    pytest.param(16, 2, 4, 2, 72, 72, 32, id="b16-gqa-tail"),
    pytest.param(32, 1, 4, 2, 40, 100, 64, id="b32-gqa-lq<lk"),
    pytest.param(64, 1, 2, 2, 200, 200, 32, id="b64-grouped-tail"),
    pytest.param(64, 1, 2, 1, 150, 230, 32, id="b64-grouped-odd-nq"),
    pytest.param(128, 1, 2, 2, 100, 300, 64, id="b128-keysplit-tail"),
    pytest.param(128, 1, 2, 2, 192, 192, 32, id="b128-keysplit-empty-tile"),  # keys 192..255: none
]


def _skip_unsupported(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in Triton's interpreter; checked on a GPU only")


def _qkv(b, hq, hkv, lq, lk, d, dtype, device, seed=0, dv=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, dv or d, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _random_mask(b, h, lq, lk, block, density=0.4, seed=0, device="cpu"):
    """Random blocks plus, per query block, the sink block 0 and the block holding the causal
    diagonal (aligned at the end), so every row keeps at least one key, causal or not."""
    nq, nk = -(-lq // block), -(-lk // block)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, nq, nk, generator=gen) < density
    mask[..., 0] = True
    diag = ((torch.arange(nq) * block).clamp_max(lq - 1) + lk - lq) // block
    mask[..., torch.arange(nq), diag] = True
    return mask.to(device)


def _reference(q, k, v, mask, block, causal, scale=None):
    """The reference in fp32 on the CPU, whatever the inputs' dtype and device."""
    f = [t.detach().float().cpu() for t in (q, k, v)]
    return block_sparse_attention_reference(*f, mask.cpu(), block, causal, scale)


def _assert_close(out, ref, dtype):
    assert out.dtype == dtype
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max |error| {err:.2e} > {TOL[dtype]:.0e}"


# ---- index lists ---------------------------------------------------------------------------

def _loop_indices(mask):
    rows = mask.reshape(-1, mask.shape[-1]).tolist()
    return [sum(r) for r in rows], [[j for j, kept in enumerate(r) if kept] for r in rows]


@pytest.mark.parametrize("shape,density", [((2, 3, 5, 7), 0.5), ((1, 1, 4, 1), 0.5), ((1, 2, 3, 9), 1.0),
                                           ((2, 1, 6, 6), 0.15)])
def test_block_indices_match_a_loop(shape, density):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < density
    mask[0, 0, 0] = False  # one row that keeps nothing
    counts, indices = block_indices(mask)
    want_counts, want_lists = _loop_indices(mask)
    assert counts.dtype == indices.dtype == torch.int32
    assert counts.shape == shape[:-1] and indices.shape == (*shape[:-1], max(want_counts))
    assert counts.flatten().tolist() == want_counts
    for row, want in zip(indices.reshape(-1, indices.shape[-1]).tolist(), want_lists):
        assert row[:len(want)] == want and all(x == 0 for x in row[len(want):])


def test_block_indices_of_an_empty_mask():
    counts, indices = block_indices(torch.zeros(1, 2, 3, 4, dtype=torch.bool))
    assert counts.tolist() == [[[0, 0, 0]] * 2] and indices.shape == (1, 2, 3, 0)


def test_kernel_block_indices_trim_causal_and_group_query_blocks():
    block, lq, lk = 64, 300, 420  # 5 query blocks (odd: the last tile covers one), 7 key blocks
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(2)) < 0.5
    counts, indices = kernel_block_indices(mask, block, lq, lk, True, 64)
    assert tile_config(block, 64).query_group == 2 and counts.shape == (2, 3, 3)
    m = mask.tolist()
    for b in range(2):
        for h in range(3):
            for t in range(3):
                rows = [i for i in (2 * t, 2 * t + 1) if i < 5]
                want = [j for j in range(7) if any(
                    m[b][h][i][j] and j * block <= min(i * block + block, lq) - 1 + lk - lq for i in rows)]
                assert counts[b, h, t].item() == len(want)
                assert indices[b, h, t, :len(want)].tolist() == want


def test_causal_block_mask_keeps_exactly_the_blocks_touching_the_lower_triangle():
    block, lq, lk = 16, 40, 70
    tok = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    padded = F.pad(tok, (0, -lk % block, 0, -lq % block))
    want = padded.unflatten(0, (-1, block)).unflatten(2, (-1, block)).any(3).any(1)
    assert torch.equal(causal_block_mask(3, 5, block, lq, lk), want)


def test_tile_config_reaches_every_tiling_path():
    # the kernel tests below rely on these: block 64 groups query blocks, 128 splits key blocks
    assert (tile_config(64, 128).query_group, tile_config(64, 128).key_split) == (2, 1)
    assert (tile_config(128, 64).query_group, tile_config(128, 64).key_split) == (1, 2)
    assert (tile_config(16, 32).block_m, tile_config(16, 32).block_n) == (16, 16)
    assert tile_config(64, 128).num_warps == 8
    with pytest.raises(ValueError, match="block must be one of"):
        tile_config(48, 64)


# ---- reference -----------------------------------------------------------------------------

def _ir_op(q, k, v, block_mask, block, causal):
    """``attn.block_sparse_sdpa``'s own reference, optional operands absent, attributes defaulted."""
    op = lookup("attn.block_sparse_sdpa")
    operands = [q, k, v, block_mask] + [None] * (len(op.operands) - 4)
    return op.reference(*operands, **op.full_attrs({"block": block, "causal": causal}))


@pytest.mark.parametrize("causal", [False, True])
def test_reference_equals_the_ir_op(causal):
    q, k, v = _qkv(2, 2, 2, 50, 70, 16, torch.float32, "cpu")
    mask = _random_mask(2, 2, 50, 70, 16)
    want = _ir_op(q, k, v, mask, 16, causal)
    assert torch.equal(block_sparse_attention_reference(q, k, v, mask, 16, causal), want)


def test_reference_repeats_kv_heads_for_gqa():
    q, k, v = _qkv(1, 4, 2, 32, 32, 16, torch.float32, "cpu")
    mask = _random_mask(1, 4, 32, 32, 16)
    out = block_sparse_attention_reference(q, k, v, mask, 16, False)
    for h in range(4):
        one = _ir_op(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], mask[:, h:h + 1], 16, False)
        torch.testing.assert_close(out[:, h:h + 1], one)


# ---- the kernel ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("block,b,hq,hkv,lq,lk,d", CASES)
def test_kernel_matches_reference(device, dtype, causal, block, b, hq, hkv, lq, lk, d):
    _skip_unsupported(device, dtype)
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, device, seed=block + lq)
    mask = _random_mask(b, hq, lq, lk, block, seed=lk, device=device)
    out = block_sparse_attention(q, k, v, mask, block, causal)
    assert out.shape == (b, hq, lq, d) and out.device.type == device
    _assert_close(out, _reference(q, k, v, mask, block, causal), dtype)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block,lq,lk,causal", [(16, 48, 48, True), (64, 130, 130, True), (32, 20, 90, False),
                                                (128, 140, 140, False)])
def test_all_true_mask_equals_dense_sdpa(device, dtype, block, lq, lk, causal):
    _skip_unsupported(device, dtype)
    q, k, v = _qkv(1, 4, 2, lq, lk, 32, dtype, device, seed=lq)
    mask = torch.ones(1, 1, -(-lq // block), -(-lk // block), dtype=torch.bool, device=device)
    out = block_sparse_attention(q, k, v, mask, block, causal)
    f = [t.float().cpu() for t in (q, k, v)]  # lq == lk when causal: SDPA's top-left = bottom-right
    want = F.scaled_dot_product_attention(*f, is_causal=causal, enable_gqa=True)
    _assert_close(out, want, dtype)


@pytest.mark.parametrize("device", kernel_devices())
def test_rows_that_keep_no_key_are_zero(device):
    q, k, v = _qkv(1, 2, 2, 80, 80, 32, torch.float32, device)
    mask = _random_mask(1, 2, 80, 80, 16, device=device)
    mask[0, 1, 2] = False  # query block 2 of head 1 keeps nothing
    out = block_sparse_attention(q, k, v, mask, 16, False)
    assert torch.equal(out[0, 1, 32:48], torch.zeros_like(out[0, 1, 32:48]))
    ref = _reference(q, k, v, mask, 16, False)
    assert torch.equal(ref[0, 1, 32:48], torch.zeros(16, 32))  # the reference agrees (SDPA: NaN)
    keep = torch.ones(80, dtype=torch.bool)
    keep[32:48] = False
    assert (out[0, 1, keep].cpu() - ref[0, 1, keep]).abs().max() <= 1e-5
    assert (out[0, 0].cpu() - ref[0, 0]).abs().max() <= 1e-5


@pytest.mark.parametrize("device", kernel_devices())
def test_causal_rows_before_the_first_key_are_zero(device):
    # Lq > Lk, causal aligned at the end: row i sees keys ≤ i − 20, so rows 0..19 see none.
    q, k, v = _qkv(1, 1, 1, 40, 20, 16, torch.float32, device)
    mask = torch.ones(1, 1, 3, 2, dtype=torch.bool, device=device)
    out = block_sparse_attention(q, k, v, mask, 16, True).cpu()
    assert torch.equal(out[0, 0, :20], torch.zeros(20, 16))
    ref = _reference(q, k, v, mask, 16, True)
    assert (out[0, 0, 20:] - ref[0, 0, 20:]).abs().max() <= 1e-5


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("mask_shape", [(1, 1), (2, 1), (1, 4)], ids=["11", "B1", "1H"])
def test_mask_broadcast_over_batch_and_heads(device, mask_shape):
    q, k, v = _qkv(2, 4, 2, 64, 64, 16, torch.float32, device, seed=3)
    mask = _random_mask(*mask_shape, 64, 64, 16, seed=4, device=device)
    out = block_sparse_attention(q, k, v, mask, 16, True)
    full = block_sparse_attention(q, k, v, mask.expand(2, 4, -1, -1).contiguous(), 16, True)
    assert torch.equal(out, full)
    _assert_close(out, _reference(q, k, v, mask, 16, True), torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_strided_inputs_custom_scale_and_value_dim(device):
    """q/k/v as transposed views of [B, L, H, D] (what attention projections give), Dv ≠ D, and
    a non-power-of-two head dim (padded to 64 inside the kernel)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 70, 2, 40, generator=gen).to(device).transpose(1, 2)
    k = torch.randn(1, 70, 2, 40, generator=gen).to(device).transpose(1, 2)
    v = torch.randn(1, 70, 2, 24, generator=gen).to(device).transpose(1, 2)
    mask = _random_mask(1, 2, 70, 70, 32, device=device)
    out = block_sparse_attention(q, k, v, mask, 32, True, 0.3)
    assert out.shape == (1, 2, 70, 24)
    _assert_close(out, _reference(q, k, v, mask, 32, True, 0.3), torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_indexed_variant_equals_the_op(device):
    q, k, v = _qkv(1, 2, 1, 150, 150, 32, torch.float16, device, seed=6)
    mask = _random_mask(1, 2, 150, 150, 64, seed=7, device=device)
    counts, indices = kernel_block_indices(mask, 64, 150, 150, True, 32)
    out = block_sparse_attention_indexed(q, k, v, mask, counts, indices, 64, True)
    assert torch.equal(out, block_sparse_attention(q, k, v, mask, 64, True))
    per_block = block_indices(mask)  # lists per mask block, not per 128-row tile
    with pytest.raises(ValueError, match="kernel_block_indices"):
        block_sparse_attention_indexed(q, k, v, mask, *per_block, 64, True)


@pytest.mark.parametrize("device", kernel_devices())
def test_the_op_launches_the_kernel_unless_told_to_use_the_reference(device, monkeypatch):
    calls = []
    launch = attn._launch
    monkeypatch.setattr(attn, "_launch", lambda *a: calls.append(1) or launch(*a))
    q, k, v = _qkv(1, 1, 1, 32, 32, 16, torch.float32, device)
    mask = _random_mask(1, 1, 32, 32, 16, device=device)
    kernel_out = block_sparse_attention(q, k, v, mask, 16, False)
    assert calls == [1]
    monkeypatch.setenv("LOWBIT_TRITON", "reference")
    ref_out = block_sparse_attention(q, k, v, mask, 16, False)
    assert calls == [1]
    assert (kernel_out - ref_out).abs().max() <= 1e-5


@pytest.mark.parametrize("device", kernel_devices())
def test_opcheck(device):
    q, k, v = _qkv(1, 2, 1, 40, 40, 16, torch.float32, device)
    mask = _random_mask(1, 2, 40, 40, 16, device=device)
    counts, indices = kernel_block_indices(mask, 16, 40, 40, True, 16)
    torch.library.opcheck(block_sparse_attention, (q, k, v, mask, 16, True, None))
    torch.library.opcheck(block_sparse_attention_indexed, (q, k, v, mask, counts, indices, 16, True, 0.5))


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(2, 8, 100, 64, dtype=torch.float16), torch.empty(2, 2, 300, 64, dtype=torch.float16)
        v = torch.empty(2, 2, 300, 32, dtype=torch.float16)
        out = torch.ops.lowbit.block_sparse_attention(q, k, v, torch.empty(1, 8, 2, 5, dtype=torch.bool), 64, False)
    assert out.shape == (2, 8, 100, 32) and out.dtype == torch.float16


@pytest.mark.parametrize("change,match", [
    (dict(block=48), "block must be one of"),
    (dict(mask_shape=(1, 2, 3, 3)), "block_mask must be bool"),
    (dict(hkv=4), "Hq a multiple of Hkv"),
    (dict(kdtype=torch.float16), "must share one of"),
    (dict(mask_device="meta"), "on one device"),
])
def test_bad_arguments_are_named(change, match):
    q, k, v = _qkv(1, 6, change.get("hkv", 2), 40, 40, 16, torch.float32, "cpu")
    k = k.to(change.get("kdtype", torch.float32))
    mask = torch.ones(change.get("mask_shape", (1, 6, 3, 3)), dtype=torch.bool, device=change.get("mask_device"))
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, mask, change.get("block", 16), False)


# ---- GPU only: sizes the interpreter is too slow for -----------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block,d", [(64, 128), (128, 128), (64, 64), (32, 128)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gpu_long_sequences(dtype, block, d, causal):
    q, k, v = _qkv(2, 8, 2, 1000, 1000, d, dtype, "cuda", seed=block)
    mask = _random_mask(2, 8, 1000, 1000, block, density=0.3, device="cuda")
    out = block_sparse_attention(q, k, v, mask, block, causal)
    _assert_close(out, _reference(q, k, v, mask, block, causal), dtype)
