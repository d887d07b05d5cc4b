"""Causal LMs traced as a decode step: the cache as graph inputs/outputs, ``generate`` equal to
transformers' greedy decoding, the cache stored quantized, and the folder ONNX Runtime GenAI
loads generating the same tokens as the torch backend."""

import pytest
import torch
import transformers as tf

import lowbit
from conftest import rel_err
from lowbit.errors import InputError, LowbitError
from lowbit.evaluate import byte_windows, perplexity
from lowbit.zoo import byte_llama


def _model(kind: str = "llama"):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg).eval()
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    model = _model()
    return model, lowbit.compile(model, (torch.randint(1, 256, (2, 9)),), progress=False)


@pytest.fixture(scope="module")
def byte():
    spec = byte_llama()
    return spec, lowbit.compile(spec.model, spec.example_inputs, progress=False)


def test_decode_step_has_the_cache_as_inputs_and_outputs(llama):
    model, fast = llama
    assert fast.traced.input_names() == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert fast.traced.output_names()[1:3] == ["present.0.key", "present.0.value"]
    assert fast.graph.inputs[3].tensor_type.shape == ("batch", 2, "past", 16)
    ids = torch.randint(1, 256, (3, 11))
    assert torch.equal(fast(ids).logits, model(ids).logits)  # a prompt: the step with an empty cache
    assert fast.cache_bytes_per_token() == 2 * 2 * 2 * 16 * 4  # layers × (k, v) × heads × dim × fp32


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generate_equals_transformers(kind):
    model = _model(kind)
    fast = lowbit.compile(model, (torch.randint(1, 256, (2, 9)),), progress=False)
    prompt = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # left padding: positions count attended tokens, as in transformers
    for m in (torch.ones_like(prompt), mask):
        ours = fast.generate(prompt, m, max_new_tokens=40)
        theirs = model.generate(prompt, attention_mask=m, max_new_tokens=40, do_sample=False)
        assert torch.equal(ours, theirs)


def test_sampling_options(llama):
    _, fast = llama
    prompt = torch.randint(1, 256, (1, 5))
    greedy = fast.generate(prompt, max_new_tokens=12)
    assert torch.equal(fast.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1), greedy)
    a = fast.generate(prompt, max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(3))
    b = fast.generate(prompt, max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 17)
    stop = int(greedy[0, 7])
    short = fast.generate(prompt, max_new_tokens=12, eos_token_id=stop)
    assert short.shape[1] <= 8 and int(short[0, -1]) == stop


def test_generate_refuses_a_model_traced_without_cache(llama):
    model, _ = llama
    flat = lowbit.trace(model, (torch.randint(1, 256, (2, 9)),), cache=False)
    with pytest.raises(InputError, match="without its key/value cache"):
        lowbit.compile(flat).generate(torch.randint(1, 256, (1, 4)))


@pytest.mark.parametrize("preset,dtype,ratio", [("int8", "i8", 0.27), ("fp8", "f8e4m3", 0.27),
                                                ("int4", "u8", 0.15), ("int4-rot", "u8", 0.16)])
def test_quantized_cache_is_stored_in_its_dtype(llama, preset, dtype, ratio):
    model, fast = llama
    calibration = [(torch.randint(1, 256, (2, 16)),)]
    q = lowbit.compile(fast.traced, kv_cache=preset, calibration=calibration, progress=False)
    assert q.graph.inputs[3].tensor_type.dtype.short == dtype
    assert q.cache_bytes_per_token() <= ratio * fast.cache_bytes_per_token() + 2 * 2 * 2 * 3  # + scales
    same = lowbit.compile(fast.traced, kv_cache=preset, calibration=calibration, progress=False)
    floats = lowbit.compile(fast.traced, pipeline=None, kv_cache=preset, calibration=calibration, progress=False,
                            kv_storage="float")
    ids = torch.randint(1, 256, (2, 13))
    assert torch.equal(q(ids).logits, same(ids).logits)
    assert torch.allclose(q(ids).logits, floats(ids).logits, atol=1e-6)  # the same values, held as floats
    prompt = torch.randint(1, 256, (1, 6))
    assert torch.equal(q.generate(prompt, max_new_tokens=10), floats.generate(prompt, max_new_tokens=10))


def test_quantized_cache_perplexity_on_byte_llama(byte):
    spec, fast = byte
    windows = byte_windows("val")[:4]
    calibration = byte_windows("calib")[:2]
    base = perplexity(fast, windows)
    for preset, bound, ratio in (("int8", 0.005, 0.27), ("int4", 0.03, 0.15), ("int4-rot", 0.03, 0.15)):
        q = lowbit.compile(fast.traced, kv_cache=preset, calibration=calibration, progress=False)
        assert perplexity(q, windows) <= base * (1 + bound), preset
        assert q.cache_bytes_per_token() <= ratio * fast.cache_bytes_per_token(), preset


def test_qk_rotation_rotates_keys_before_the_cache(llama):
    _, fast = llama
    q = lowbit.compile(fast.traced, kv_cache="int4-rot", calibration=[(torch.randint(1, 256, (2, 16)),)],
                       progress=False)
    hadamards = [n for n in q.graph.nodes if n.op == "rotate.hadamard"]
    assert len(hadamards) == 4  # per layer: the query, and the new keys where they enter the cache
    assert any(u.op == "quant.dynamic_quantize" for h in hadamards for u in h.result.users)


def test_genai_folder_refuses_a_quantized_cache(llama, tmp_path):
    _, fast = llama
    q = lowbit.compile(fast.traced, kv_cache="int8", calibration=[(torch.randint(1, 256, (2, 16)),)],
                       progress=False)
    with pytest.raises(LowbitError, match="kv_storage"):
        q.export_genai(tmp_path / "out")
    assert not any((tmp_path / "out").glob("*.onnx")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("name,recipe,kv", [("tiny-llama", None, None), ("tiny-llama", "w4a16", None),
                                            ("byte-llama", "w4a8", None),
                                            ("byte-llama", "w4a16", None), ("byte-llama", "w4a16-gptq", "int8")])
def test_onnxruntime_genai_generates_the_same_tokens(name, recipe, kv, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from lowbit.backends.onnx.genai import genai_generate
    from lowbit.zoo import ZOO

    spec = ZOO[name]()
    calibration = byte_windows("calib")[:2] if name == "byte-llama" else [spec.example_inputs]
    q = lowbit.compile(spec.model, spec.example_inputs, recipe=recipe, calibration=calibration, kv_cache=kv,
                       kv_storage="float", progress=False)
    out = q.export_genai(tmp_path / "genai")
    assert {"model.onnx", "genai_config.json"} <= {f.name for f in out.iterdir()}
    prompt = spec.example_inputs[0][:1, :12]
    # The runtimes sum in different orders; where our two best next tokens are within that
    # noise, greedy decoding may take either (byte-llama w4a8 on some CPUs: first step, top two
    # 0.019 apart, both runtimes rounding activations to int8), and the sequences part.
    _assert_same_greedy_tokens(q, prompt, genai_generate(out, prompt, 32), 32, tie=0.05)


@pytest.mark.parametrize("family,recipe", [("gpt-oss", "w4a16"), ("deepseek-v3", None)])
def test_onnxruntime_genai_generates_the_same_tokens_on_families(family, recipe, tmp_path):
    """gpt-oss: a sliding window shorter than prompt + new tokens, and a router whose top-k a
    slightly different linear flips (ONNX Runtime's MatMulNBits at its default int8 activations
    did, 3 tokens in); deepseek-v3: multi-head latent attention, whose cached latents differ in
    width (16 and 8), held as two halves of 12."""
    pytest.importorskip("onnxruntime_genai")
    from lowbit.backends.onnx.genai import genai_generate
    from lowbit.families import build_model, make_inputs

    model = build_model(family)
    calibration = [make_inputs(model, "ids", b, n, seed=i) for i, (b, n) in enumerate([(2, 7), (1, 12), (3, 20)])]
    q = lowbit.compile(model, make_inputs(model, "ids", 2, 9), recipe=recipe, calibration=calibration,
                       kv_storage="float", progress=False)
    out = q.export_genai(tmp_path / "genai")
    prompt = make_inputs(model, "ids", 1, 6, seed=9)[0]
    _assert_same_greedy_tokens(q, prompt, genai_generate(out, prompt, 12), 12, tie=1e-4)


def test_genai_folder_refuses_a_cache_it_cannot_allocate(tmp_path):
    """Latents of widths 15 and 8 have no two equal halves: refused before anything is written."""
    cfg = tf.DeepseekV3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=48,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=15, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    fast = lowbit.compile(tf.DeepseekV3ForCausalLM(cfg).eval(), (torch.randint(1, 256, (2, 9)),), progress=False)
    with pytest.raises(LowbitError, match=r"layer 0's key/value cache .* 15 \+ 8 do not split"):
        fast.export_genai(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _assert_same_greedy_tokens(q, prompt, theirs: list[int], new: int, tie: float) -> None:
    """ORT GenAI's greedy tokens equal ours, or every token it chose is our argmax on its own
    sequence but for at most two near-ties (our top two within ``tie``)."""
    n = prompt.shape[1]
    ours = q.generate(prompt, max_new_tokens=new, eos_token_id=[])[0, n:].tolist()
    if theirs == ours:
        return
    with torch.no_grad():
        logits = q(torch.cat([prompt, torch.tensor([theirs])], 1)).logits[0, n - 1:-1]
    gap = logits.max(-1).values - logits[torch.arange(new), torch.tensor(theirs)]
    assert (gap <= tie).all() and int((gap > 0).sum()) <= 2, (ours, theirs, gap)


def test_generate_on_the_triton_backend(llama):
    """The triton backend's kernels (Triton's interpreter on a CPU) in the decode loop."""
    pytest.importorskip("triton")
    _, fast = llama
    calibration = [(torch.randint(1, 256, (2, 16)),)]
    torch_q = lowbit.compile(fast.traced, recipe="w8a8-dynamic", calibration=calibration, progress=False)
    triton_q = lowbit.compile(fast.traced, recipe="w8a8-dynamic", calibration=calibration, progress=False,
                              backend="triton")
    assert triton_q.kernel_nodes()
    prompt = torch.randint(1, 256, (1, 5))
    assert torch.equal(triton_q.generate(prompt, max_new_tokens=8), torch_q.generate(prompt, max_new_tokens=8))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 4e-2)])
def test_a_model_compiled_in_fp32_runs_and_generates_after_half(dtype, tol):
    """``.to(dtype)`` after compiling in fp32, as a GPU user does: the casts that were no-ops when
    traced (rotary cos/sin to the activations' dtype, a norm's result back from fp32) are restored,
    so the activations stay in ``dtype`` and the linears meet weights of their own dtype."""
    model = _model()
    calibration = [(torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    fast = lowbit.compile(model, (torch.randint(1, 256, (2, 9)),), recipe="w8a8-static", calibration=calibration,
                          progress=False)
    ids = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    want = fast(ids).logits
    kept = [fast._buffer_names[n] for n in fast._quantizer_constants if n in fast._buffer_names]
    before = {n: getattr(fast, n).dtype for n in kept}
    fast.to(dtype)
    assert torch.float32 in before.values()  # scales and zero points are not rounded
    assert {n: getattr(fast, n).dtype for n in kept} == before
    got = fast(ids)
    assert got.logits.dtype == dtype
    assert rel_err(got.logits, want) < tol
    out = fast.generate(ids[:1, :5], max_new_tokens=6)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids[:1, :5])
    fast.float()  # and back: the traced dtype again, nothing cast
    assert rel_err(fast(ids).logits, want) < tol


def test_mixed_float_operands_meet_in_one_dtype():
    """On the activation path in the run dtype; off it (positions × inverse frequencies, as a
    matmul in some transformers versions) promoted to the wider, which a matmul does not do."""
    from lowbit.backends.torch.run_dtype import casting

    half, full = torch.randn(2, 4).half(), torch.randn(4, 3)
    with pytest.raises(RuntimeError):
        torch.matmul(half, full)
    assert casting(torch.matmul, torch.float16)(half, full).dtype == torch.float16
    assert casting(torch.matmul, None)(half, full).dtype == torch.float32
    mask = torch.full((2, 3), torch.finfo(torch.float32).min)
    assert casting(torch.add, torch.float16)(half[:, :3], mask).isfinite().all()  # clamped, not −inf


def test_fp8_codes_stay_fp8_after_half():
    """``Module.half()`` converts every floating-point tensor, fp8 too: the compiled model keeps its
    fp8 weight codes as they are and still runs."""
    model = _model()
    calibration = [(torch.randint(1, 256, (2, 16)),)]
    fast = lowbit.compile(model, (torch.randint(1, 256, (2, 9)),), recipe="fp8", calibration=calibration,
                          progress=False)
    ids = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    want = fast(ids).logits
    fp8 = {n for n, t in fast.named_buffers() if t.dtype == torch.float8_e4m3fn}
    fast.half()
    assert fp8 and all(t.dtype == torch.float8_e4m3fn for n, t in fast.named_buffers() if n in fp8)
    assert rel_err(fast(ids).logits, want) < 3e-2


def test_a_compiled_model_creates_its_tensors_on_the_device_it_was_moved_to():
    """The tensors a traced graph makes (aranges, masks) follow ``.to(device)``, not the device the
    model was traced on; the meta device stands in for a GPU."""
    fast = lowbit.compile(_model(), (torch.randint(1, 256, (2, 9)),), progress=False).to("meta")
    out = fast(torch.randint(1, 256, (2, 7), device="meta")).logits
    assert out.device.type == "meta" and out.shape == (2, 7, 256)
