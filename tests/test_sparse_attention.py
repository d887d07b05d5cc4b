"""sparse-attention: the block-mask builder's rules, the pass on real models, its quality figures,
and the ONNX lowering (dense attention with the block mask) run by ONNX Runtime."""

import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit import zoo
from lowbit.errors import LowbitError
from lowbit.ir.dialects.attn import build_block_mask
from lowbit.passes.sparse_attention import attention_quality

OPTS = dict(block=8, method="sparsity", topk=2, sparsity=0.5, mass=0.9, sinks=1, window=2, scale=None, causal=False)


def qk(heads=4, kv_heads=2, lq=64, lk=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, heads, lq, 16, generator=g), torch.randn(2, kv_heads, lk, 16, generator=g)


def test_causal_mask_keeps_sinks_window_and_nothing_above_the_diagonal():
    q, k = qk()
    m = build_block_mask(q, k, None, **{**OPTS, "causal": True})
    assert m.shape == (2, 4, 8, 8)
    upper = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert not (m & upper).any()
    assert m[..., 0].all()  # the sink block
    diag = torch.arange(8)
    assert m[..., diag, diag].all() and m[..., diag[1:], diag[1:] - 1].all()  # the local window


def test_sparsity_is_a_per_head_budget():
    q, k = qk(lq=256, lk=256)  # 32 × 32 blocks of 8
    allowed = 32 * 33 // 2
    forced = 32 + 31 + 30  # sink column, diagonal, the block before it
    for target in (0.5, 0.75, 0.95):
        m = build_block_mask(q, k, None, **{**OPTS, "sparsity": target, "causal": True})
        kept = m.sum((-1, -2))
        assert (kept == max(forced, math.ceil((1 - target) * allowed))).all(), (target, kept)


def test_topk_keeps_forced_plus_k_per_row_and_mass_reaches_its_estimate():
    q, k = qk()
    m = build_block_mask(q, k, None, **{**OPTS, "method": "topk", "causal": False})
    # bidirectional window 2 = the diagonal and one block each side; plus the sink
    diag = torch.arange(8)
    forced = (diag[:, None] - diag[None, :]).abs() <= 1
    forced[:, 0] = True
    assert (m.sum(-1) == forced.sum(-1) + 2).all()
    loose = build_block_mask(q, k, None, **{**OPTS, "method": "mass", "mass": 0.5})
    tight = build_block_mask(q, k, None, **{**OPTS, "method": "mass", "mass": 0.99})
    assert (loose & ~tight).sum() == 0 and tight.sum() > loose.sum()


def test_padding_mask_excludes_padded_key_blocks():
    q, k = qk(heads=2, kv_heads=2)
    pad = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    pad[..., 40:] = False  # keys 40.. are padding: blocks 5, 6, 7 hold none
    m = build_block_mask(q, k, pad, **{**OPTS, "sparsity": 0.0, "causal": False})
    assert not m[..., 5:].any() and m[..., :5].all()


def test_zero_sparsity_equals_dense_on_llama_and_minilm():
    for spec in (zoo.tiny_llama(), zoo.minilm()):
        dense = lowbit.compile(spec.model, spec.example_inputs, progress=False, dynamic_shapes=spec.dynamic_shapes,
                               kwargs=spec.kwargs)
        sparse = lowbit.compile(spec.model, spec.example_inputs, progress=False, dynamic_shapes=spec.dynamic_shapes,
                                kwargs=spec.kwargs, pipeline="sparse-attention{method=sparsity,sparsity=0.0,block=4}")
        ops = [n.op for n in sparse.graph.nodes]
        assert "core.sdpa" not in ops and ops.count("attn.block_sparse_sdpa") == ops.count("attn.block_mask") > 0
        a, b = dense(*spec.example_inputs), sparse(*spec.example_inputs)
        key = "logits" if hasattr(a, "logits") else "last_hidden_state"
        assert torch.allclose(getattr(a, key), getattr(b, key), atol=1e-5)


def test_bad_options_are_refused():
    for bad in ("method=foo", "sparsity=1.5", "block=0", "mass=0.0"):
        with pytest.raises(LowbitError, match="sparse-attention"):
            spec = zoo.tiny_llama()
            lowbit.compile(spec.model, spec.example_inputs, pipeline=f"sparse-attention{{{bad}}}", progress=False)


@pytest.mark.slow
def test_byte_llama_perplexity_at_half_sparsity_on_its_longest_context():
    """Acceptance: ≤ 2% perplexity rise at 50% block sparsity over the whole 256-byte context."""
    from lowbit.evaluate import byte_windows, perplexity

    spec = zoo.byte_llama()
    evals = byte_windows("val")
    assert evals[0][0].shape[1] == spec.model.config.max_position_embeddings
    q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, progress=False,
                       pipeline="sparse-attention{method=sparsity,sparsity=0.5,block=16}")
    rise = perplexity(q, evals) / perplexity(spec.model, evals) - 1
    rows = attention_quality(q.graph, q.traced.flatten_inputs((evals[0][0][:4],), None))
    assert len(rows) == 4 and all(0.49 <= r["sparsity"] <= 0.55 for r in rows), rows
    assert all(0.5 < r["mass kept"] < 1.0 and 0.0 < r["rel err"] < 1.0 for r in rows), rows
    assert rise <= 0.02, f"perplexity +{100 * rise:.2f}% at 50% sparsity"


@pytest.mark.slow
def test_minilm_cosine_at_the_default_setting():
    from lowbit.evaluate import minilm_batches, minilm_cosine, minilm_passages

    spec = zoo.minilm()
    q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, progress=False,
                       pipeline="sparse-attention")
    assert minilm_cosine(q, spec.model, minilm_batches("eval"))["mean"] >= 0.99
    passages = minilm_passages()
    assert passages[0][0].shape[1] > 128  # long enough for several 64-token blocks
    assert minilm_cosine(q, spec.model, passages)["mean"] >= 0.99
    rows = attention_quality(q.graph, q.traced.flatten_inputs(passages[0], None))
    assert any(r["sparsity"] > 0 for r in rows) and all(r["mass kept"] > 0.95 for r in rows)


@pytest.mark.parametrize("block", [4, 16])
def test_onnx_lowering_runs_on_onnx_runtime(tmp_path, block):
    """Block 16 is traced from a 16-token example: the export lengthens it past one block (at
    one block torch.export took the block count for a constant and the masks came out wrong)."""
    import onnxruntime as ort

    spec = zoo.tiny_llama()
    q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, progress=False,
                       pipeline=f"sparse-attention{{method=sparsity,sparsity=0.5,block={block}}}")
    q.export_onnx(tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((2, 16), (3, 23), (1, 77)):
        ids = torch.randint(0, 200, shape, generator=torch.Generator().manual_seed(1))
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), q.traced.flatten_inputs((ids,)))}
        out = sess.run(None, feeds)[0]  # a decode step (its cache empty): every input fed
        assert np.abs(out - q(ids).logits.numpy()).max() < 1e-4


def test_block_csr_is_the_batch_union_row_by_row():
    from lowbit.backends.onnx.sparse_attention import block_csr, csr_layout

    mask = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    rows, cols = block_csr(mask)
    union = mask.any(0)
    assert rows.dtype == cols.dtype == torch.int32 and cols.shape == (3, 25)
    assert torch.equal(rows[:, -1], union.sum((1, 2)).int())
    for h in range(3):  # kept columns in row-major order, then −1 padding
        assert cols[h].tolist() == union[h].nonzero()[:, 1].tolist() + [-1] * (25 - int(union[h].sum()))
    assert torch.equal(csr_layout(rows, cols, 5), union)


def test_export_reference_attends_within_the_csr_layout():
    from lowbit.backends.onnx.sparse_attention import block_csr, sparse_attention
    from lowbit.ir.dialects.attn import block_sparse_sdpa

    q, k = qk(lq=37, lk=37)
    v = torch.randn_like(k)
    mask = build_block_mask(q, k, None, **{**OPTS, "causal": True})
    union = mask.any(0, keepdim=True).expand_as(mask)
    got = sparse_attention(q, k, v, *block_csr(mask), 8, 0.25)
    assert torch.allclose(got, block_sparse_sdpa(q, k, v, union, None, block=8, causal=True, scale=0.25), atol=1e-6)


SPARSE_PIPELINE = "sparse-attention{method=sparsity,sparsity=0.5,block=16,window=1,causal=true}"


def test_sparse_attention_contrib_op_matches_the_torch_backend(tmp_path):
    """com.microsoft.SparseAttention run by ONNX Runtime's CPU kernel, layouts half sparse."""
    import onnx
    import onnxruntime as ort

    from lowbit.backends.onnx.sparse_attention import cache_names, run
    from lowbit.backends.onnx.validate import check
    from lowbit.ir.interpreter import Executor

    spec = zoo.tiny_llama()
    q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, progress=False,
                       pipeline=SPARSE_PIPELINE, cache=False)
    path, _ = q.export_onnx(tmp_path / "m.onnx", sparse_attention="contrib")
    check(path)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("SparseAttention") == 2  # one per layer
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert len(cache_names(sess)) == 2
    for shape in ((1, 96), (1, 77), (1, 200)):
        ids = torch.randint(0, 200, shape, generator=torch.Generator().manual_seed(1))
        rows = attention_quality(q.graph, [ids])
        assert all(0.3 < r["sparsity"] <= 0.6 for r in rows)  # really sparse: the op's sparse path runs
        assert np.abs(run(sess, {"input_ids": ids.numpy()})[0] - q(ids).logits.numpy()).max() < 1e-4

    def union(node):  # the graph with each block mask widened to the union over the batch
        if node.op == "attn.block_mask":
            from lowbit.ir.dialects.attn import build_block_mask

            return (lambda qq, kk, m, **a: build_block_mask(qq, kk, m, **a).any(0, keepdim=True)
                    .expand(qq.shape[0], -1, -1, -1)), dict(node.attrs)
        return None

    ids = torch.randint(0, 200, (3, 80), generator=torch.Generator().manual_seed(2))
    want = Executor(q.graph, override=union).run([ids])[0]
    assert np.abs(run(sess, {"input_ids": ids.numpy()})[0] - want.numpy()).max() < 1e-4


def test_sparse_attention_contrib_op_in_float16(tmp_path):
    """The form ONNX Runtime's CUDA kernel takes (half precision), run here by its CPU kernel."""
    import onnxruntime as ort

    from lowbit.backends.onnx.sparse_attention import run

    spec = zoo.tiny_llama()
    q = lowbit.compile(spec.model.half(), spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, progress=False,
                       pipeline=SPARSE_PIPELINE, cache=False)
    with pytest.warns(UserWarning, match="head dim 128 and block 64, this model has 16 and 16"):
        path, _ = q.export_onnx(tmp_path / "m.onnx", sparse_attention="contrib")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 200, (1, 77), generator=torch.Generator().manual_seed(1))
    out = run(sess, {"input_ids": ids.numpy()})[0]
    assert out.dtype == np.float16
    assert np.abs(out.astype(np.float32) - q(ids).logits.float().numpy()).max() < 3e-3


def test_cli_exports_half_precision_sparse_attention(tmp_path, capsys):
    import re

    from lowbit.cli import main

    assert main(["export", "tiny-llama", "--dtype", "float16", "--pipeline", SPARSE_PIPELINE,
                 "--sparse-attention", "contrib", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: com.microsoft.SparseAttention will run on ONNX Runtime's CPU kernel only" in out
    assert "ONNX checker (full): passed" in out
    assert float(re.search(r"max \|diff\| (\S+),", out).group(1)) < 3e-3
    assert (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("pipeline, reason", [
    ("sparse-attention{block=16}", "not causal"),
    ("sparse-attention{block=8,causal=true}", "block 8 is not one of"),
    (None, "no attn.block_sparse_sdpa"),
])
def test_sparse_attention_contrib_op_refuses_what_does_not_fit(tmp_path, pipeline, reason):
    spec = zoo.tiny_llama()
    q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, progress=False,
                       pipeline=pipeline, cache=False)
    with pytest.raises(LowbitError, match=reason):
        q.export_onnx(tmp_path / "m.onnx", sparse_attention="contrib")
    assert not any(tmp_path.iterdir())
