"""lowbit.compile(..., backend="triton"): every quantized linear, rotation and block-sparse
attention dispatched to a kernel, results equal to the torch backend's. On CPU the kernels run in
Triton's interpreter (conftest sets TRITON_INTERPRET=1); the GPU test runs them compiled."""

from collections import Counter

import pytest
import torch

import lowbit
from conftest import kernel_devices, rel_err
from lowbit import zoo

RECIPES = {  # recipe → the kernels its linears must run on (tiny-llama, hidden 64: 8 linears, the output head float)
    "w8a8": {"scaled_mm": 7},  # the output head stays float
    "w8a8-dynamic": {"scaled_mm": 7},
    "w4a16-rtn": {"w4a16_mm": 7},
    # hidden 64 < group 128: one group per row, i.e. per-channel int4 with zero points, which the
    # integer GEMM takes (codes less zero point as int8)
    "w4a8-rot": {"scaled_mm": 5, "hadamard_quant+scaled_mm": 2},
    "w4a4-rot": {"scaled_mm": 5, "hadamard_quant+scaled_mm": 2},
    "w4a16-gptq": {"w4a16_mm": 7},  # int4 weights with float activations stay on the dequantizing GEMM
    "w8a8-rot": {"scaled_mm": 7, "hadamard": 2},
}


@pytest.fixture(scope="module")
def llama():
    spec = zoo.tiny_llama(layers=1, hidden=64)
    calibration = [(zoo._token_inputs(256, seed=i),) for i in range(2)]
    return spec, calibration


def compile_both(spec, calibration, recipe, **kw):
    args = dict(recipe=recipe, calibration=calibration, dynamic_shapes=spec.dynamic_shapes, progress=False, **kw)
    return lowbit.compile(spec.model, spec.example_inputs, **args), \
        lowbit.compile(spec.model, spec.example_inputs, backend="triton", **args)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_triton_backend_matches_torch_backend(llama, recipe, device):
    spec, calibration = llama
    ref, fast = compile_both(spec, calibration, recipe)
    assert Counter(fast.kernel_nodes().values()) == RECIPES[recipe]
    ids = zoo._token_inputs(256, batch=2, seq=5, seed=7)
    want = ref(ids).logits
    got = fast.to(device)(ids.to(device)).logits.cpu()
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("weights,acts", [("int4/channel", "uint4/tensor/asym"), ("int4/channel/asym", "uint4/tensor/asym"),
                                          ("int4/channel/asym", "uint4/token/dynamic")])
def test_4_bit_codes_with_zero_points_run_on_the_integer_gemm(llama, weights, acts):
    """int4 per-channel weights with zero points (codes less zero point, as int8) and uint4
    activations, static (codes held in uint8) or per token, on the integer GEMM, as torch computes."""
    spec, calibration = llama
    ref, fast = compile_both(spec, calibration, None, pipeline=f"insert-qdq{{weights={weights},acts={acts}}}")
    assert Counter(fast.kernel_nodes().values()) == {"scaled_mm": 7}
    ids = zoo._token_inputs(256, batch=2, seq=5, seed=7)
    assert rel_err(fast(ids).logits, ref(ids).logits) < 1e-5


def test_weights_are_packed_once_and_survive_half(llama):
    spec, calibration = llama
    ref, fast = compile_both(spec, calibration, "w4a16-rtn")
    packed = dict(fast.kernels.named_buffers())
    assert any(name.endswith("qweight") and t.dtype == torch.uint8 for name, t in packed.items())
    # the unpacked int4 weights and their scales are not kept beside the packed ones
    assert len(fast._buffer_names) < len(fast.graph.tensors)
    fast.half()
    modules = list(fast.kernels.values())
    assert modules and all(m.scales.dtype == torch.int32 for m in modules)  # fp32 bit patterns, untouched
    assert all(m.qweight.dtype == torch.uint8 for m in modules)


def test_unknown_backend_is_refused(llama):
    spec, _ = llama
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*torch, triton"):
        lowbit.compile(spec.model, spec.example_inputs, backend="cuda")


def test_block_sparse_attention_runs_on_the_kernel_when_causal(llama):
    spec, _ = llama
    pipe = "sparse-attention{method=sparsity,sparsity=0.5,block=16,causal=true}"
    ref = lowbit.compile(spec.model, spec.example_inputs, pipeline=pipe, dynamic_shapes=spec.dynamic_shapes, progress=False)
    fast = lowbit.compile(spec.model, spec.example_inputs, pipeline=pipe, dynamic_shapes=spec.dynamic_shapes,
                          progress=False, backend="triton")
    assert list(fast.kernel_nodes().values()) == ["block_sparse_attention"]
    ids = zoo._token_inputs(256, batch=1, seq=40, seed=3)
    assert rel_err(fast(ids).logits, ref(ids).logits) < 1e-5


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-rtn", "w4a8-rot", "fp8"])
def test_triton_backend_in_half_precision(llama, recipe, device):
    """Compiled in fp32, then ``.to(device).half()`` as a GPU user does (the kernels in fp16; on
    the CPU in Triton's interpreter): the fp8 codes and fp32 scales survive, the activations stay
    fp16 through the rotary embedding and the norms."""
    spec, calibration = llama
    ref, fast = compile_both(spec, calibration, recipe)
    ids = zoo._token_inputs(256, batch=2, seq=5, seed=7)
    got = fast.to(device).half()(ids.to(device)).logits
    assert got.dtype == torch.float16
    assert rel_err(got, ref(ids).logits) < 2e-2
