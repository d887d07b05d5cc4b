"""Rotation: Hadamard constructions and the fast transform, the lossless rotation passes on
Llama-family models, residual-stream discovery, and what rotation buys at 4 bits."""

import math

import pytest
import torch

from lowbit import zoo
from lowbit.api import build
from lowbit.ir.dialects.hadamard import BASES, factor, hadamard_matrix, hadamard_transform
from lowbit.passes.rotate import find_residual_stream

SIZES = sorted({m * 2**k for m in BASES for k in range(15) if m * 2**k <= 16384})


@pytest.mark.parametrize("m", BASES)
def test_base_matrices_are_hadamard(m):
    h = hadamard_matrix(m)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


def test_fast_transform_equals_dense_for_every_size_up_to_16384():
    gen = torch.Generator().manual_seed(0)
    for n in SIZES:
        x = torch.randn(2, n, generator=gen, dtype=torch.float64)
        dense = x @ hadamard_matrix(n).T / math.sqrt(n)
        assert (hadamard_transform(x) - dense).abs().max() <= 1e-5, n
    assert len(SIZES) > 80 and {16384, 384, 28 * 64, 52 * 32, 40 * 8} <= set(SIZES) and 11008 not in SIZES
    with pytest.raises(ValueError, match="no Hadamard matrix of size 156"):
        factor(156)


@pytest.mark.parametrize("name", ["tiny-llama", "byte-llama"])
def test_rotation_passes_are_lossless_on_llama(name):
    spec = zoo.ZOO[name]()  # both use grouped-query attention (4 query, 2 key/value heads)
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline="fuse-norms,rotate-residual{seed=3},online-hadamard", progress=False)
    rot = records[-3:]
    assert [r.name.split("{")[0] for r in rot] == ["fuse-norms", "rotate-residual", "online-hadamard"]
    assert all(r.changed and r.drift < 1e-4 for r in rot), rot
    ops = [n.op for n in traced.graph.nodes]
    assert ops.count("rotate.hadamard") == spec.model.config.num_hidden_layers


def test_residual_stream_found_from_the_graph():
    spec = zoo.tiny_llama(layers=3)
    traced, _ = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                      pipeline="fuse-norms", progress=False, measure_drift=False)
    stream = find_residual_stream(traced.graph)
    assert not isinstance(stream, str), stream
    assert len(stream.norms) == 2 * 3 + 1  # two per block and the final norm
    assert sorted(n.op for n in stream.sources).count("core.embedding") == 1
    assert len(stream.sources) == 1 + 2 * 3  # embedding, o_proj and down_proj per block
    assert any(n.loc.module == "lm_head" for n in stream.readers)


def test_rotation_explains_why_not():
    spec = zoo.tiny_llama()
    traced, _ = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                      pipeline="rotate-residual", progress=False, measure_drift=False)
    assert any("run fuse-norms first" in n for n in traced.notes)
    spec = zoo.tiny_gpt2()
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline="rotate-residual", progress=False, measure_drift=False)
    assert not records[-1].changed and any("RMSNorm" in n for n in traced.notes)


def test_rotation_halves_the_w4a4_perplexity_gap():
    from lowbit.evaluate import quality_table

    rows = {r["recipe"]: r["perplexity"] for r in quality_table("byte-llama", ["w4a4", "w4a4-rot"],
                                                                 progress=False)}
    assert (rows["w4a4-rot"] - rows["fp32"]) <= 0.5 * (rows["w4a4"] - rows["fp32"]), rows
