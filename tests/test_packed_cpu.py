"""The torch backend's packed CPU GEMMs (backends/torch/packed.py): each equals its node's
reference op, runs where it should (checked with the profiler) and leaves the reference to every
node and call it cannot take."""

from collections import Counter

import pytest
import torch

import lowbit
from conftest import rel_err
from lowbit import zoo
from lowbit.backends.torch import CompiledModule, packed
from lowbit.ir import Graph, TensorType
from lowbit.ir.dialects.quant import linear
from lowbit.ir.interpreter import node_callable
from lowbit.ir.types import DType

INT4 = "aten::_weight_int4pack_mm_for_cpu"
INT8 = "aten::_weight_int8pack_mm"


def run(fn, *args):
    """fn(*args) and the packed kernels it called."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, {e.name for e in prof.events() if e.name in (INT4, INT8)}


def weights(n, k, dtype, group=None, zero=False, seed=0):
    """Random codes of ``dtype`` [n, k] with scales (and zero points) per channel or per group."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = dtype.int_range
    shape = (n,) if group is None else (n, k // group)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen).to(dtype.storage)
    s = torch.rand(shape, generator=gen) * 0.05 + 1e-3
    z = torch.randint(lo, hi + 1, shape, generator=gen).to(dtype.storage) if zero else None
    return q, s, z


def single_node(q, s, z, dtype, op="quant.linear", **attrs):
    """A graph of one quantized linear on an input [m, k]; returns it and the node."""
    g = Graph()
    x = g.add_input("x", TensorType(("m", q.shape[1]), DType.f32))
    ops = [g.constant(q, "w.q", dtype=dtype), g.constant(s, "w.scale"),
           None if z is None else g.constant(z, "w.zero", dtype=dtype), None]
    node = g.append(op, [x, *ops], attrs)
    g.set_outputs([node.result])
    return g, node


def reference(node, x, q, s, z):
    fn, attrs = node_callable(node)
    return fn(x, q, s, z, None, **attrs)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype,zero", [(DType.i4, False), (DType.u4, True), (DType.i4, True)])
def test_int4_groups_match_the_reference(group, dtype, zero):
    q, s, z = weights(48, 512, dtype, group, zero)
    g, node = single_node(q, s, z, dtype, axis=1, group_size=group)
    module = packed.prepare(node, g)
    assert isinstance(module, packed.Int4Linear)
    x = torch.randn(1, 2, 512)  # 3-D, two rows: the fp32 kernel runs
    got, ran = run(module, x, None, None, None, None)
    assert ran == {INT4}
    assert got.shape == (1, 2, 48) and rel_err(got, reference(node, x, q, s, z)) < 1e-6
    xb = torch.randn(2, 5, 512).bfloat16()  # bf16: the kernel at any size
    got, ran = run(module, xb, None, None, None, None)
    assert ran == {INT4} and rel_err(got, reference(node, xb.float(), q, s, z)) < 1e-2


@pytest.mark.parametrize("dtype,zero,group", [(DType.i8, False, None), (DType.u4, True, None),
                                               (DType.i4, True, 256), (DType.i4, False, "tensor")])
def test_int8_per_channel_matches_the_reference_bit_for_bit_when_it_falls_back(dtype, zero, group):
    """Per output channel (or per tensor, or one group spanning K): int8pack_mm; on more rows
    than the fp32 kernel pays off for, the reference runs on the module's own W_q − z."""
    q, s, z = weights(40, 256, dtype, None if group == "tensor" else group, zero)
    attrs = {"axis": 1, "group_size": group} if group == 256 else {"axis": 0}
    if group == "tensor":
        s, attrs = s[:1].reshape(()), {}
    g, node = single_node(q, s, z, dtype, **attrs)
    module = packed.prepare(node, g)
    assert isinstance(module, packed.Int8Linear)
    x = torch.randn(2, 256)
    got, ran = run(module, x, None, None, None, None)
    assert ran == {INT8} and rel_err(got, reference(node, x, q, s, z)) < 1e-6
    x = torch.randn(3, 7, 256)
    got, ran = run(module, x, None, None, None, None)
    assert not ran and torch.equal(got, reference(node, x, q, s, z))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weight", ["int8", "int4"])
def test_dynamic_linear_quantizes_its_input_as_the_reference(symmetric, weight):
    dtype, group = (DType.i8, None) if weight == "int8" else (DType.i4, 64)
    q, s, z = weights(32, 128, dtype, group)
    act = DType.i8 if symmetric else DType.u8
    attrs = {"axis": 0} if group is None else {"axis": 1, "group_size": group}
    g, node = single_node(q, s, z, dtype, op="quant.dynamic_linear", act_dtype=act, symmetric=symmetric, **attrs)
    module = packed.prepare(node, g)
    assert packed.kind(node, g) == weight
    x = torch.randn(1, 128) * 3 + 1
    bias = torch.randn(32)
    got, ran = run(module, x, None, None, None, bias)
    want = reference(node, x, q, s, z) + bias
    assert ran and rel_err(got, want) < 1e-6
    # the per-token rounding is the reference's: without it the error is that of 8-bit activations
    assert rel_err(linear(x, q, s, z, bias, axis=attrs["axis"], group_size=group), want) > 1e-4


@pytest.mark.parametrize("case", ["group16", "n_not_16", "int8_groups", "uint8_zero", "int8_zero", "fp8"])
def test_weights_the_kernels_cannot_take_keep_the_reference(case):
    n, k, dtype, group, zero = {"group16": (32, 128, DType.i4, 16, False),
                                "n_not_16": (40, 128, DType.i4, 64, True),
                                "int8_groups": (32, 128, DType.i8, 64, False),
                                "uint8_zero": (32, 128, DType.u8, None, True),
                                "int8_zero": (32, 128, DType.i8, None, True),
                                "fp8": (32, 128, DType.i8, None, False)}[case]
    q, s, z = weights(n, k, dtype, group, zero)
    if case == "fp8":
        q, dtype = (q.float() / 16).to(torch.float8_e4m3fn), DType.f8e4m3
    g, node = single_node(q, s, z, dtype, **({"axis": 0} if group is None else {"axis": 1, "group_size": group}))
    assert packed.kind(node, g) is None and not packed.prepare_all(g) and not packed.consumed_constants(g)


def test_other_devices_run_the_reference_and_state_dict_loads_repack():
    q, s, z = weights(32, 256, DType.u4, 128, True)
    g, node = single_node(q, s, z, DType.u4, axis=1, group_size=128)
    module = packed.prepare(node, g)
    assert {"packed", "scale_and_zeros"}.isdisjoint(module.state_dict())  # the CPU layout is derived
    meta = packed.prepare(node, g).to("meta")
    assert meta(torch.randn(1, 256, device="meta"), None, None, None, None).shape == (1, 32)
    q2, s2, z2 = weights(32, 256, DType.u4, 128, True, seed=1)
    module.load_state_dict({"weight_q": q2, "scale": s2, "zero_point": z2})
    x = torch.randn(1, 256)
    got, ran = run(module, x, None, None, None, None)
    assert ran == {INT4} and rel_err(got, reference(node, x, q2, s2, z2)) < 1e-6


@pytest.fixture(scope="module")
def llama():
    """Hidden 128, FFN 256: int4/group128 weights are one group per channel on six linears
    (int8pack_mm) and two groups on down_proj (int4pack_mm); the output head stays float."""
    spec = zoo.tiny_llama(layers=1, hidden=128)
    calibration = [(zoo._token_inputs(256, seed=i),) for i in range(2)]
    return {recipe: lowbit.compile(spec.model, spec.example_inputs, recipe=recipe, calibration=calibration,
                                   dynamic_shapes=spec.dynamic_shapes, progress=False)
            for recipe in ("w4a16", "w8a8-dynamic")}


@pytest.mark.parametrize("recipe,kernels", [("w4a16", {"int8pack_mm": 6, "int4pack_mm": 1}),
                                            ("w8a8-dynamic", {"int8pack_mm": 7})])
def test_llama_runs_on_the_packed_kernels_and_equals_the_reference(llama, recipe, kernels):
    fast = llama[recipe]
    ref = CompiledModule(fast.traced, pack=False)
    assert Counter(fast.kernel_nodes().values()) == kernels and ref.kernel_nodes() == {}
    assert len(fast._buffer_names) < len(ref._buffer_names)  # codes and scales are held once
    decode = zoo._token_inputs(256, batch=1, seq=2, seed=3)
    got, ran = run(lambda ids: fast(ids).logits, decode)
    want, ran_ref = run(lambda ids: ref(ids).logits, decode)
    assert ran == {INT8 if k == "int8pack_mm" else INT4 for k in kernels} and not ran_ref
    assert rel_err(got, want) < 1e-5
    prefill = zoo._token_inputs(256, batch=2, seq=9, seed=4)  # fp32, 18 rows: the reference runs
    got, ran = run(lambda ids: fast(ids).logits, prefill)
    assert not ran and torch.equal(got, ref(prefill).logits)


def test_bfloat16_llama_runs_on_the_kernels_at_any_size():
    """Traced in bfloat16 (a float32 trace run in bfloat16 keeps float32 where it cast to it)."""
    spec = zoo.tiny_llama(layers=1, hidden=128)
    fast = lowbit.compile(spec.model.bfloat16(), spec.example_inputs, recipe="w4a16-rtn",
                          dynamic_shapes=spec.dynamic_shapes, progress=False)
    ref = CompiledModule(fast.traced, pack=False)
    ids = zoo._token_inputs(256, batch=2, seq=9, seed=4)
    got, ran = run(lambda i: fast(i).logits, ids)
    assert ran == {INT4, INT8} and got.dtype == torch.bfloat16
    assert rel_err(got, ref(ids).logits) < 2e-2
