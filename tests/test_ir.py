"""The IR itself: building, verifying, printing/parsing, the interpreter, the dialects."""

import networkx as nx
import pytest
import torch

from lowbit.errors import ParseError, VerifyError
from lowbit.ir import (CallArgs, DType, Graph, Ref, TensorType, clone_graph, parse_graph,
                       print_graph, run_graph, to_networkx, verify)
from lowbit.ir.dialects.quant import expand_scale
from lowbit.ir.dialects.rotate import fast_hadamard, sylvester_hadamard


def _small_graph() -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(("batch", 4), DType.f32))
    w = g.constant(torch.randn(8, 4), "w")
    y = g.append("core.linear", [x, w, None]).result
    r = g.append("core.relu", [y]).result
    v = g.append("aten.view.default", [r], {"args": CallArgs((Ref(0), (-1, 2, 4)))},
                 [TensorType(("batch", 2, 4), DType.f32)]).result
    g.set_outputs([v])
    return g


def test_build_verify_run():
    g = _small_graph()
    verify(g)
    x = torch.randn(3, 4)
    (out,) = run_graph(g, [x])
    w = g.tensors["w"]
    assert torch.allclose(out, torch.relu(x @ w.T).view(-1, 2, 4))


def test_use_lists_follow_edits():
    g = _small_graph()
    x = g.inputs[0]
    relu = next(n for n in g.nodes if n.op == "core.relu")
    linear = relu.operand(0).producer
    assert [u.node for u in linear.result.uses] == [relu]
    tanh = g.append("core.tanh", [linear.result], before=relu)
    relu.set_operand(0, tanh.result)
    assert [u.node for u in linear.result.uses] == [tanh]
    assert [u.node for u in tanh.result.uses] == [relu]
    verify(g)
    relu.set_operand(0, linear.result)
    g.erase(tanh)
    assert [u.node for u in linear.result.uses] == [relu]
    verify(g)
    assert x.uses[0].node is linear


def test_erase_refuses_used_node():
    g = _small_graph()
    linear = next(n for n in g.nodes if n.op == "core.linear")
    with pytest.raises(ValueError, match="still used"):
        g.erase(linear)


def test_verify_catches_bad_graphs():
    g = _small_graph()
    relu = next(n for n in g.nodes if n.op == "core.relu")
    relu.attrs["dim"] = 1
    with pytest.raises(VerifyError, match="unknown attribute 'dim'"):
        verify(g)
    del relu.attrs["dim"]
    relu.results[0].type = TensorType(("batch", 9), DType.f32)
    with pytest.raises(VerifyError, match="does not match the inferred"):
        verify(g)


def test_verify_catches_use_before_def():
    text = """graph @main(%x: f32[2,4]) {
  %a = core.relu(%x) : f32[2,4]
  return %a
}"""
    g = parse_graph(text)
    a = next(g.nodes)
    b = g.append("core.tanh", [a.result], before=a)
    a.set_operand(0, b.result)  # now b uses a, a uses b: a cycle, b uses a before a is defined
    with pytest.raises(VerifyError, match="used before it is defined"):
        verify(g)


def test_verify_rejects_wrong_operand_count_and_attr_kind():
    g = Graph()
    x = g.add_input("x", TensorType((2, 4), DType.f32))
    node = g.append("core.softmax", [x], {"dim": 1.5}, [x.type])
    g.set_outputs([node.result])
    with pytest.raises(VerifyError, match="dim=1.5 must be int"):
        verify(g)


def test_parse_error_points_at_token():
    text = "graph @main(%x: f32[2,4]) {\n  %a = core.relu(%y) : f32[2,4]\n  return %a\n}"
    with pytest.raises(ParseError) as e:
        parse_graph(text)
    assert "line 2" in str(e.value) and "%y is used before it is defined" in str(e.value)
    with pytest.raises(ParseError, match="unknown op 'core.rleu'; did you mean core.relu"):
        parse_graph(text.replace("core.relu(%y)", "core.rleu(%x)"))


def test_round_trip_and_clone():
    g = _small_graph()
    text = print_graph(g)
    assert print_graph(parse_graph(text, g.tensors)) == text
    copy = clone_graph(g)
    copy.set_tensor(next(copy.nodes).result, torch.zeros(8, 4))
    assert not torch.equal(g.tensors["w"], copy.tensors["w"])


def test_literals_round_trip():
    call = CallArgs((Ref(0), -1, 2.5, 1e-06, float("inf"), True, None, "tanh", DType.bf16, ()),
                    (("dim", (0, -1)),))
    g = Graph()
    x = g.add_input("x", TensorType((2,), DType.f32))
    n = g.append("aten.foo.default", [x], {"args": call}, [x.type])
    g.set_outputs([n.result])
    text = print_graph(g)
    assert "aten.foo.default(%x, -1, 2.5, 1e-06, inf, true, none, \"tanh\", bf16, [], dim=[0, -1])" in text
    assert parse_graph(text).nodes.__next__().attrs["args"] == call


def test_to_networkx():
    g = _small_graph()
    dg = to_networkx(g)
    assert nx.is_directed_acyclic_graph(dg)
    view = next(n for n in g.nodes if n.op == "aten.view.default")
    assert g.inputs[0] in nx.ancestors(dg, view)


def test_quantize_dequantize_per_channel_and_group():
    g = Graph()
    x = g.add_input("x", TensorType((4, 8), DType.f32))
    xv = torch.randn(4, 8)
    scale_c = (xv.abs().amax(1) / 127)
    s = g.constant(scale_c, "s")
    q = g.append("quant.quantize", [x, s, None], {"dtype": DType.i8, "axis": 0}).result
    dq = g.append("quant.dequantize", [q, s, None], {"axis": 0}).result
    scale_g = xv.abs().reshape(4, 2, 4).amax(-1) / 7
    sg = g.constant(scale_g, "sg")
    q4 = g.append("quant.quantize", [x, sg, None], {"dtype": DType.i4, "axis": 1, "group_size": 4}).result
    dq4 = g.append("quant.dequantize", [q4, sg, None], {"axis": 1, "group_size": 4}).result
    g.set_outputs([q, dq, q4, dq4])
    verify(g)
    qv, dqv, q4v, dq4v = run_graph(g, [xv])
    assert qv.dtype == torch.int8 and qv.abs().max() <= 127
    assert (dqv - xv).abs().max() <= scale_c.max() / 2 + 1e-6
    assert q4v.min() >= -8 and q4v.max() <= 7
    assert ((dq4v - xv).abs() <= expand_scale(scale_g, xv, 1, 4) / 2 + 1e-6).all()


def test_hadamard_fast_equals_dense_and_is_involution():
    for n in (1, 2, 8, 64, 256):
        x = torch.randn(3, n, dtype=torch.float64)
        dense = x @ (sylvester_hadamard(n).double() / n ** 0.5)
        assert torch.allclose(fast_hadamard(x), dense, atol=1e-10)
        assert torch.allclose(fast_hadamard(fast_hadamard(x)), x, atol=1e-10)
    with pytest.raises(ValueError):
        fast_hadamard(torch.randn(2, 12))


def test_block_sparse_full_mask_equals_dense():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    g = Graph()
    ins = [g.add_input(n, TensorType((1, 2, 10, 8), DType.f32)) for n in "qkv"]
    mask = g.constant(torch.ones(1, 2, 3, 3, dtype=torch.bool), "mask")
    out = g.append("attn.block_sparse_sdpa", [*ins, mask, None], {"block": 4, "causal": True}).result
    g.set_outputs([out])
    verify(g)
    (o,) = run_graph(g, [q, k, v])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(o, ref, atol=1e-6)
