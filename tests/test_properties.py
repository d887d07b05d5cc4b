"""Property tests over random small graphs: they verify, round-trip through printer and parser,
and every registered lossless pass keeps them valid, keeps their numbers and is idempotent."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err, sample_inputs
from lowbit.ir import (CallArgs, DType, Graph, Ref, TensorType, clone_graph, parse_graph,
                       print_graph, run_graph, verify)
from lowbit.passes import PASSES, PassContext

UNARY = ["core.relu", "core.silu", "core.tanh", "core.sigmoid", "core.gelu", "core.softmax"]


@st.composite
def graphs(draw) -> Graph:
    g = Graph()
    rows = draw(st.sampled_from([1, 2, "batch"]))
    width = draw(st.sampled_from([2, 4, 8]))
    values = [g.add_input("x", TensorType((rows, width), DType.f32))]
    n_const = 0

    def const(shape) -> object:
        nonlocal n_const
        n_const += 1
        gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
        return g.constant(torch.randn(shape, generator=gen), f"c{n_const}")

    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["linear", "unary", "binary", "norm", "opaque", "transpose2"]))
        x = draw(st.sampled_from(values))
        d = x.tensor_type.shape[-1]
        if kind == "linear":
            out = draw(st.sampled_from([2, 4, 8]))
            bias = const((out,)) if draw(st.booleans()) else None
            node = g.append("core.linear", [x, const((out, d)), bias])
        elif kind == "unary":
            op = draw(st.sampled_from(UNARY))
            node = g.append(op, [x], {"dim": -1} if op == "core.softmax" else {})
        elif kind == "binary":
            same = [v for v in values if v.type == x.type]
            node = g.append(draw(st.sampled_from(["core.add", "core.mul", "core.sub"])),
                            [x, draw(st.sampled_from(same))])
        elif kind == "norm":
            node = (g.append("core.rms_norm", [x, const((d,))], {"eps": 1e-6}) if draw(st.booleans())
                    else g.append("core.layer_norm", [x, const((d,)), const((d,))],
                                  {"normalized_shape": (d,), "eps": 1e-5}))
        elif kind == "opaque":
            factor = draw(st.sampled_from([1.0, 0.5, 2.0]))
            node = g.append("aten.mul.Tensor", [x], {"args": CallArgs((Ref(0), factor))}, [x.type])
        else:  # a constant computed from constants: something to fold
            c = const((d, d))
            node = g.append("aten.t.default", [c], {"args": CallArgs((Ref(0),))}, [c.type])
        values.append(node.result)
    outs = [values[-1]] + ([values[1]] if len(values) > 2 and draw(st.booleans()) else [])
    g.set_outputs([v for v in outs if isinstance(v.type, TensorType)])
    return g


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(graphs())
def test_random_graphs_verify_and_round_trip(g):
    verify(g)
    text = print_graph(g)
    again = parse_graph(text, g.tensors)
    verify(again)
    assert print_graph(again) == text


@SETTINGS
@given(graphs(), st.sampled_from(sorted(name for name, cls in PASSES.items() if cls.lossless)))
def test_lossless_passes_keep_function_and_are_idempotent(g, pass_name):
    inputs = sample_inputs(g, {"batch": 3})
    before = run_graph(g, inputs)
    work = clone_graph(g)
    p = PASSES[pass_name]()
    ctx = PassContext(calibration=[sample_inputs(g, {"batch": 3}, seed=s) for s in range(1, 3)],
                      progress=False)
    p.run(work, ctx)
    verify(work)
    after = run_graph(work, inputs)
    for a, b in zip(after, before):
        assert rel_err(a, b) < 1e-5
    if PASSES[pass_name].idempotent:
        text = print_graph(work)
        assert not p.run(work, ctx), f"{pass_name} changed the graph a second time"
        assert print_graph(work) == text
