"""Real architectures end to end: trace with dynamic batch/sequence, verify, print, re-parse
to the same text, and interpret to within 1e-5 of eager fp32 at two different shapes."""

import pytest
import torch

from conftest import rel_err
from lowbit import zoo
from lowbit.frontend import trace
from lowbit.ir import parse_graph, print_graph, run_graph, verify
from lowbit.quant.experts import GROUPED_MM


def _second_inputs(name: str, spec: zoo.ModelSpec) -> tuple:
    """Inputs of another batch size (and sequence length where there is one)."""
    gen = torch.Generator().manual_seed(1)
    if name == "minilm":
        tok = zoo.minilm_tokenizer()
        enc = tok(["Short one.", "A second, rather longer sentence to pad the batch out.",
                   "Third."], padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    x = spec.example_inputs[0]
    if x.dtype == torch.long:
        return (torch.randint(0, 256, (3, 11), generator=gen),)
    return (torch.randn((3,) + tuple(x.shape[1:]), generator=gen),)


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in out.values()] if hasattr(out, "values") else list(out)


@pytest.fixture(scope="module", params=list(zoo.ZOO))
def traced(request):
    spec = zoo.ZOO[request.param]()
    return request.param, spec, trace(spec.model, spec.example_inputs,
                                      dynamic_shapes=spec.dynamic_shapes)


def test_verify_print_reparse(traced):
    _, _, t = traced
    verify(t.graph)
    text = print_graph(t.graph)
    again = parse_graph(text, t.graph.tensors)
    verify(again)
    assert print_graph(again) == text


def test_symbolic_dims_are_named(traced):
    name, _, t = traced
    dims = {d for v in t.graph.inputs for d in v.tensor_type.shape if isinstance(d, str)}
    assert "batch" in dims
    if name in ("tiny-llama", "tiny-gpt2", "minilm", "byte-llama", "byte-llama-192", "byte-moe"):
        assert "seq" in dims


@pytest.mark.parametrize("which", ["example", "other shape"])
def test_interprets_like_eager(traced, which):
    name, spec, t = traced
    inputs = spec.example_inputs if which == "example" else _second_inputs(name, spec)
    with torch.no_grad():
        expected = _flat_outputs(spec.model(*inputs))
    got = _flat_outputs(t.unflatten_outputs(run_graph(t.graph, t.flatten_inputs(inputs))))  # a decoder: minus its cache
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert rel_err(g, e) <= 1e-5


def test_canonical_ops_present(traced):
    name, _, t = traced
    ops = {n.op for n in t.graph.nodes}
    assert not any(op.startswith("aten.dropout") or op == "aten.addmm.default" for op in ops)
    expected = {"tiny-llama": {"core.rms_norm", "core.sdpa", "core.linear"},
                "byte-llama": {"core.rms_norm", "core.sdpa", "core.linear"},
                "byte-llama-192": {"core.rms_norm", "core.sdpa", "core.linear"},
                "byte-moe": {"core.rms_norm", "core.sdpa", "core.linear", *GROUPED_MM},
                "tiny-gpt2": {"core.layer_norm", "core.sdpa", "core.linear"},
                "minilm": {"core.layer_norm", "core.sdpa", "core.linear", "core.gelu"},
                "tiny-vit": {"core.layer_norm", "core.sdpa", "core.conv2d"},
                "tiny-cnn": {"core.conv2d", "core.relu", "core.linear"}}[name]
    assert expected <= ops
    if name == "tiny-cnn":
        assert "core.batch_norm" not in ops  # folded into the convs


def test_locations_are_module_paths(traced):
    name, _, t = traced
    linears = [n for n in t.graph.nodes if n.op == "core.linear"]
    assert linears and all(n.loc.module for n in linears)
    if name == "tiny-llama":
        assert any(n.loc.module == "model.layers.0.self_attn.q_proj" for n in linears)
