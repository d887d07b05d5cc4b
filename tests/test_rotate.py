"""Rotation: Hadamard constructions and the fast transform, the lossless rotation passes on
Llama-family models, residual-stream discovery (what rotation buys at 4 bits: test_shapes_accuracy.py)."""

import math

import pytest
import torch

from conftest import rel_err, sample_inputs
from lowbit import zoo
from lowbit.api import build
from lowbit.ir import DType, Graph, TensorType, clone_graph, run_graph, verify
from lowbit.ir.dialects.hadamard import _base, describe, factor, hadamard_matrix, hadamard_transform, plan
from lowbit.passes import PASSES, PassContext
from lowbit.passes.rotate import find_residual_stream

# MLP widths (and hidden sizes) of Llama-2/3, Qwen2.5/3, Mistral, Gemma 2/3, Phi-3 and TinyLlama
FFN_WIDTHS = (11008, 13824, 28672, 14336, 8192, 5632, 4864, 8960, 18944, 27648, 29568, 3072, 6144, 9728,
              12288, 17408, 25600, 9216, 36864, 6912, 10240, 15360, 21504, 17920, 896, 1536, 3584, 2304,
              1152, 2560, 3840, 5376, 528)
# Paley bases over prime powers p^e with e = 1, 2, 3 (GF(25), GF(27), GF(343)...)
PALEY = (12, 20, 28, 36, 52, 60, 108, 140, 244, 344, 26 * 4)


def _is_orthogonal_basis(kind: str, m: int) -> bool:
    b = torch.tensor(_base(kind, m))
    if kind != "orthogonal" and not set(b.unique().tolist()) <= {-1.0, 1.0}:
        return False
    return torch.allclose(b @ b.T, m * torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-9 * m)


@pytest.mark.parametrize("m", PALEY)
def test_paley_bases_are_hadamard(m):
    p = plan(m)
    assert p.exact and p.base_order * p.power == m
    assert torch.equal(hadamard_matrix(m) @ hadamard_matrix(m).T, m * torch.eye(m, dtype=torch.float64))


def test_every_size_has_an_exact_transform():
    """n = 64·k up to 32768 and the listed widths: every factor is a Hadamard matrix (±1, B·Bᵀ = mI)
    or a stated orthogonal substitute (R·Rᵀ = I); the Kronecker product of such factors is one too."""
    sizes = sorted({64 * k for k in range(1, 513)} | set(FFN_WIDTHS))
    bases = set()
    for n in sizes:
        p = plan(n)
        assert p.base_order * p.power == n and p.power & (p.power - 1) == 0, n
        assert max((m for _, m in p.bases), default=1) <= 1024
        bases |= set(p.bases)
    assert all(_is_orthogonal_basis(kind, m) for kind, m in bases)
    assert all(plan(n).exact for n in FFN_WIDTHS), [describe(n) for n in FFN_WIDTHS if not plan(n).exact]
    exact = sum(plan(n).exact for n in sizes)
    assert exact / len(sizes) > 0.75, exact  # substitutes only where an odd factor has no Paley base


@pytest.mark.parametrize("n", [12, 20, 156, 172, 192, 528, 6, 7, 96 * 7, 2240, 4672, 64 * 35])
def test_fast_transform_equals_dense(n):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    dense = x @ hadamard_matrix(n).T / math.sqrt(n)
    assert (hadamard_transform(x) - dense).abs().max() <= 1e-9
    assert (hadamard_transform(x, butterflies=False) - dense).abs().max() <= 1e-9
    assert torch.allclose(hadamard_transform(x).norm(dim=-1), x.norm(dim=-1))
    exact = plan(n).exact
    assert exact == (n not in (156, 172, 6, 7, 4672)), describe(n)
    assert describe(n).startswith("Hadamard" if exact else "orthogonal (not Hadamard)")


def test_large_widths_use_kronecker_factors():
    assert describe(11008) == "Hadamard 11008 = Paley I(343) ⊗ H_32"
    assert factor(5632) == (44, 128) and factor(13824) == (108, 128) and factor(576) == (36, 16) and factor(2304) == (36, 64)


ROTATION = "fuse-norms,rotate-residual{seed=3},online-hadamard"


@pytest.mark.parametrize("name", ["tiny-llama", "byte-llama"])
def test_rotation_passes_are_lossless_on_llama(name):
    spec = zoo.ZOO[name]()  # both use grouped-query attention (4 query, 2 key/value heads)
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline=ROTATION, progress=False)
    rot = records[-3:]
    assert [r.name.split("{")[0] for r in rot] == ["fuse-norms", "rotate-residual", "online-hadamard"]
    assert all(r.changed and r.drift < 1e-4 for r in rot), rot
    hadamards = [n.loc.module for n in traced.graph.nodes if n.op == "rotate.hadamard"]
    # online only where the residual rotation does not reach: o_proj and down_proj inputs
    assert len(hadamards) == 2 * spec.model.config.num_hidden_layers
    assert all(m.endswith(("o_proj", "down_proj")) for m in hadamards), hadamards


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-vit"])
def test_rotation_passes_are_lossless_on_pre_layernorm_models(name):
    spec = zoo.ZOO[name]()
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline=ROTATION, progress=False)
    assert all(r.changed and r.drift < 1e-4 for r in records[-3:]), records[-3:]
    ops = [n.op for n in traced.graph.nodes]
    assert "core.layer_norm" not in ops  # centered stream: every LayerNorm is a weightless RMSNorm
    assert all(n.operands[1] is None for n in traced.graph.nodes if n.op == "core.rms_norm")


@pytest.mark.parametrize("name", ["gemma", "cohere"])
def test_norms_written_out_are_found_and_rotated(name):
    """Norms that arrive in other forms become norm ops, so the rotation folds them as Llama's:
    Gemma's RMSNorm scales by 1 + w, a constant only once folded (canonicalization gives it
    to the norm as its weight); Cohere writes LayerNorm out, (x − mean) · rsqrt(var + ε) · w,
    computing x − mean twice. Before, each norm kept its multiply or stayed ATen ops and the
    rotation refused both models."""
    from lowbit.families import build_family

    spec = build_family(name)
    traced, _ = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, progress=False)
    ops = [n.op for n in traced.graph.nodes]
    norms = [n for n in traced.graph.nodes if n.op in ("core.rms_norm", "core.layer_norm")]
    per_layer = {"gemma": 2, "cohere": 1}[name]  # Cohere's attention and MLP read one norm (parallel)
    assert len(norms) == per_layer * spec.model.config.num_hidden_layers + 1, ops
    assert norms and all(n.operands[1] is not None for n in norms) and "aten.rsqrt.default" not in ops
    assert not any(n.op == "core.mul" and any(o.producer in norms for o in n.operands) for n in traced.graph.nodes)
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline=ROTATION, progress=False)
    assert all(r.changed and r.drift < 1e-4 for r in records[-3:]), records[-3:]
    assert not [n for n in traced.notes if "fuse-norms" in n or "rotate-residual" in n], traced.notes


def test_rotation_of_a_post_norm_model_is_online_only():
    spec = zoo.minilm()
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline=ROTATION, progress=False)
    fuse, rotate, online = records[-3:]
    assert not fuse.changed and not rotate.changed and any("post-norm" in n for n in traced.notes)
    assert online.changed and online.drift < 1e-4
    linears = [n for n in traced.graph.nodes if n.op == "core.linear"]
    hadamards = [n for n in traced.graph.nodes if n.op == "rotate.hadamard"]
    assert all(n.operand(0).producer.op == "rotate.hadamard" for n in linears)
    assert len(hadamards) == 4 * 6 + 1  # q/k/v share one; attention output, FFN up, FFN down; pooler


def test_residual_stream_found_from_the_graph():
    spec = zoo.tiny_llama(layers=3)
    traced, _ = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                      pipeline="fuse-norms", progress=False, measure_drift=False)
    stream = find_residual_stream(traced.graph)
    assert not isinstance(stream, str), stream
    assert len(stream.norms) == 2 * 3 + 1  # two per block and the final norm
    assert [e.producer.op for e in stream.entries].count("core.embedding") == 1
    assert len(stream.entries) == 1 + 2 * 3  # embedding, o_proj and down_proj per block
    assert any(n.loc.module == "lm_head" for n in stream.readers)
    spec = zoo.tiny_gpt2()  # token and position embeddings; linears read through reshapes
    traced, _ = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                      progress=False, measure_drift=False)
    stream = find_residual_stream(traced.graph)
    assert not isinstance(stream, str), stream
    assert {n.op for n in stream.norms} == {"core.layer_norm"} and len(stream.norms) == 2 * 2 + 1
    assert sorted(e.producer.op for e in stream.entries).count("core.embedding") == 2


def _input_stream_graph(final_norm: str) -> tuple[Graph, object]:
    """x → LayerNorm → linear, added back to x, then ``final_norm`` → head: the input enters the stream."""
    g = Graph()
    x = g.add_input("x", TensorType(("batch", 8), DType.f32))
    gen = torch.Generator().manual_seed(0)

    def norm(v, op):
        gamma = g.constant(torch.rand(8, generator=gen) + 0.5, "g")
        if op == "core.rms_norm":
            return g.append(op, [v, gamma], {"eps": 1e-6}).result
        beta = g.constant(torch.randn(8, generator=gen), "b")
        return g.append(op, [v, gamma, beta], {"normalized_shape": (8,), "eps": 1e-5}).result

    lin = g.append("core.linear", [norm(x, "core.layer_norm"), g.constant(torch.randn(8, 8, generator=gen), "w"),
                                   None])
    add = g.append("core.add", [x, lin.result])
    head = g.append("core.linear", [norm(add.result, final_norm), g.constant(torch.randn(4, 8, generator=gen), "h"),
                                    None])
    g.set_outputs([head.result])
    return g, x


@pytest.mark.parametrize("final_norm", ["core.layer_norm", "core.rms_norm"])
def test_stream_entered_by_a_graph_input_is_found_and_fused(final_norm):
    g, x = _input_stream_graph(final_norm)
    stream = find_residual_stream(g)
    assert not isinstance(stream, str), stream
    assert x in stream.entries and len(stream.norms) == 2
    inputs = sample_inputs(g, {"batch": 3})
    work, ctx = clone_graph(g), PassContext(progress=False)
    changed = PASSES["fuse-norms"]().run(work, ctx)
    verify(work)
    assert rel_err(run_graph(work, inputs)[0], run_graph(g, inputs)[0]) < 1e-5
    if final_norm == "core.rms_norm":  # centering for the LayerNorm would change the RMSNorm
        assert not changed and any("both LayerNorm and RMSNorm" in n for n in ctx.notes)
    else:  # the input is centered by a linear after it; both norms lose their scales
        assert changed and all(n.operands[1] is None for n in work.nodes if n.op in ("core.rms_norm",))
        assert not any(n.op == "core.layer_norm" for n in work.nodes)


def test_tied_embedding_gets_its_own_copy():
    spec = zoo.tiny_gpt2()  # lm_head shares wte's weight
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline="fuse-norms,rotate-residual", progress=False)
    emb = next(n for n in traced.graph.nodes if n.op == "core.embedding" and n.loc.module.endswith("wte"))
    head = next(n for n in traced.graph.nodes if n.op == "core.linear" and n.loc.module == "lm_head")
    assert emb.operands[0] is not head.operands[1]
    assert records[-1].drift < 1e-4


def test_rotation_explains_why_not():
    spec = zoo.tiny_llama()
    traced, _ = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                      pipeline="rotate-residual", progress=False, measure_drift=False)
    assert any("run fuse-norms first" in n for n in traced.notes)


def test_query_and_key_rotated_after_rope_for_kv_quantization():
    spec = zoo.tiny_llama()
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline="online-hadamard{where=none,qk=true}", progress=False)
    assert records[-1].changed and records[-1].drift < 1e-4
    attention = [n for n in traced.graph.nodes if n.op == "core.sdpa"]
    assert attention and all(n.operand(0).producer.op == "rotate.hadamard" for n in attention)
    for n in attention:  # keys are rotated where they enter the decode step's cache, values are not
        joins = [_cache_join(n.operand(i)) for i in (1, 2)]
        assert [j.op for j in joins] == ["aten.cat.default"] * 2
        assert joins[0].operand(1).producer.op == "rotate.hadamard" != joins[1].operand(1).producer.op
    # and a quantized K/V cache goes on the rotated query and key
    kv = "insert-qdq{weights=int8/channel,acts=none,kv=int8/token/dynamic}"
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline="online-hadamard{where=none,qk=true}," + kv,
                            calibration=[spec.example_inputs], progress=False)
    assert 0 < records[-1].drift < 0.1
    for n in (n for n in traced.graph.nodes if n.op == "core.sdpa"):
        assert n.operand(1).producer.op.startswith("quant.") and n.operand(0).producer.op == "rotate.hadamard"


def _cache_join(value):
    """The node a (grouped-query expanded) key or value comes from: the cache's cat."""
    while value.producer.op.startswith("aten.") and value.producer.op != "aten.cat.default":
        value = value.producer.operands[0]
    return value.producer
