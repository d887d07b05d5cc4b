"""Hybrid and state-space causal LMs: the recurrent layers' fixed-size states (convolution
inputs, scan states) traced as cache inputs and outputs beside attention's keys and values,
so one graph serves prompts of any length and decoding; and the models whose transformers
code cannot be traced for every length say so instead of computing wrong numbers."""

import pytest
import torch

import lowbit
from lowbit.errors import InputError, LowbitError
from lowbit.families import build_model


def _prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 255, (batch, length), generator=torch.Generator().manual_seed(seed))


def _equal_at_lengths_and_in_generation(model, fast, lengths: tuple[int, ...], ids: torch.Tensor) -> None:
    """Prompts of each length equal eager; greedy tokens from ``ids`` (its second row
    left-padded) equal transformers'."""
    for length in lengths:
        prompt = _prompt(2, length, seed=length)
        want = model(prompt).logits
        assert ((fast(prompt).logits - want).abs().max() / want.abs().max()).item() < 1e-4, length
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast.generate(ids, mask, max_new_tokens=6), theirs)


@pytest.fixture(scope="module")
def hybrid():
    """Granite 4's architecture: a Mamba-2 layer, an attention layer, MoE; scans in chunks of 16."""
    model = build_model("granitemoehybrid")
    return model, lowbit.compile(model, (_prompt(2, 9),), progress=False)


def test_states_are_cache_inputs_beside_keys_and_values(hybrid):
    _, fast = hybrid
    names = fast.traced.input_names()
    assert names[3:] == ["past_key_values.0.conv", "past_key_values.0.state",
                         "past_key_values.1.key", "past_key_values.1.value"]
    conv, state, key = (fast.graph.inputs[i].tensor_type.shape for i in (3, 4, 5))
    assert conv[0] == state[0] == "batch" and all(isinstance(d, int) for d in conv[1:] + state[1:])
    assert key[2] == "past"
    assert any("fixed-size states" in n for n in fast.traced.notes)
    # the states are per sequence, not per token: only attention's cache grows
    assert fast.cache_bytes_per_token() == 2 * key[1] * key[3] * 4


@pytest.mark.parametrize("length", [1, 9, 16, 50])
def test_prompts_of_any_length_equal_eager(hybrid, length):
    """Traced on an example spanning several chunks of the scan: 1, one chunk, several."""
    model, fast = hybrid
    ids = _prompt(2, length, seed=length)
    want = model(ids).logits
    got = fast(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_greedy_generate_equals_transformers_with_left_padding(hybrid):
    model, fast = hybrid
    ids = _prompt(3, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id or 0)
    ours = fast.generate(ids, mask, max_new_tokens=10)
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)
    alone = fast.generate(ids[1:2, 3:], max_new_tokens=10)  # the padded row, unpadded
    assert torch.equal(alone[0, -10:], ours[1, -10:])


def test_quantized_model_with_int8_cache_keeps_states_float(hybrid):
    model, fast = hybrid
    calibration = [(_prompt(2, n, seed=n),) for n in (12, 40)]
    q = lowbit.compile(fast.traced, recipe="w8a8", kv_cache="int8", calibration=calibration, progress=False)
    notes = " ".join(q.traced.notes)
    assert "fixed-size states" in notes and "stay float" in notes
    kinds = {v.name: v.tensor_type.dtype.short for v in q.graph.inputs[3:]}
    assert kinds["past_0_conv"] == kinds["past_0_state"] == "f32" and kinds["past_1_key"] == "i8"
    assert q.cache_bytes_per_token() < fast.cache_bytes_per_token()
    ids = _prompt(2, 30, seed=7)
    want = model(ids).logits
    assert ((q(ids).logits - want).norm() / want.norm()).item() < 0.15
    out = q.generate(ids, max_new_tokens=6)
    assert out.shape == (2, 36)


def test_save_and_load_keep_the_states(hybrid, tmp_path):
    _, fast = hybrid
    fast.save(tmp_path / "m")
    loaded = lowbit.load(tmp_path / "m")
    ids = _prompt(2, 20, seed=3)
    assert torch.equal(loaded.generate(ids, max_new_tokens=5), fast.generate(ids, max_new_tokens=5))


def test_genai_folder_refuses_states_naming_them(hybrid, tmp_path):
    _, fast = hybrid
    with pytest.raises(LowbitError, match=r"past_0_conv.*export_onnx"):
        fast.export_genai(tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_model_without_attention_generates_from_states_alone():
    model = build_model("mamba2")
    fast = lowbit.compile(model, (_prompt(2, 9),), progress=False)
    assert all(n.rsplit(".", 1)[1] in ("conv", "state") for n in fast.traced.input_names()[3:])
    assert fast.cache_bytes_per_token() == 0
    ids = _prompt(2, 40)  # three chunks of the scan and a part
    assert ((fast(ids).logits - model(ids).logits).abs().max() / model(ids).logits.abs().max()).item() < 1e-4
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=8), theirs)


def test_a_token_loop_runs_prompts_token_by_token():
    """Mamba (1) loops over the tokens in Python and reads its state only on a one-token call:
    its step takes one token, prompts run token by token, and generation equals transformers'."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                               state_size=8)).eval()
    fast = lowbit.compile(model, (_prompt(2, 9),), progress=False)
    assert fast.traced.decoder.max_step == 1
    assert any("token by token" in n for n in fast.traced.notes)
    _equal_at_lengths_and_in_generation(model, fast, (1, 9, 30), _prompt(3, 12))


def test_a_length_torch_export_fixed_is_said_not_computed_wrong():
    """RecurrentGemma keeps its own cache and loops over the tokens in Python: traced without
    the cache, at the example's length; the note says so, and another length is refused with
    that reason, not computed wrong."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.RecurrentGemmaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, lru_width=64, block_types=["recurrent", "attention"])
    model = tf.RecurrentGemmaForCausalLM(config).eval()
    fast = lowbit.compile(model, (_prompt(2, 9),), progress=False)
    note = " ".join(fast.traced.notes)
    assert "fixed at the example's size" in note and "cannot generate" in note
    ids = _prompt(2, 9, seed=4)
    assert torch.allclose(fast(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(InputError, match=r"fixed at 9 \(.*Python loop"):
        fast(_prompt(2, 12))


@pytest.fixture(scope="module")
def deltanet():
    """Qwen3-Next's gated DeltaNet: transformers loops over chunks of 64 tokens in Python."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3NextConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                layer_types=["linear_attention", "full_attention"], num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                linear_value_head_dim=16)
    model = tf.Qwen3NextForCausalLM(config).eval()
    return model, lowbit.compile(model, (_prompt(2, 9),), progress=False)


@pytest.mark.slow
def test_a_chunk_loop_runs_longer_prompts_in_steps(deltanet, tmp_path):
    """The step holds for one chunk; longer prompts run chunk by chunk, each from the cache of
    the one before: every length equals eager, generation equals transformers' (left padding
    included), calibration batches longer than a chunk quantize, and saving keeps the limit."""
    model, fast = deltanet
    assert fast.traced.decoder.max_step == 64
    assert any("chunks of 64 tokens (in Python" in n for n in fast.traced.notes)
    ids = _prompt(2, 70)
    _equal_at_lengths_and_in_generation(model, fast, (1, 64, 65, 150), ids)
    q = lowbit.compile(fast.traced, recipe="w8a8", calibration=[(_prompt(2, n, seed=n),) for n in (30, 100)],
                       progress=False)
    want = model(ids).logits
    assert ((q(ids).logits - want).norm() / want.norm()).item() < 0.15
    q.save(tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.traced.decoder.max_step == 64
    assert torch.equal(loaded(ids).logits, q(ids).logits)


def test_a_folder_is_read_one_chunk_a_step(hybrid, tmp_path):
    """Compiled from its files, the model's weights are not in memory to check a trace of
    several chunks against: the step takes one chunk, and longer prompts run in pieces."""
    model, _ = hybrid
    model.save_pretrained(tmp_path / "hf")
    ids = _prompt(2, 40)
    fast = lowbit.compile(tmp_path / "hf", (ids,), progress=False)
    assert fast.traced.decoder.max_step == 16
    assert any("read from its files" in n for n in fast.traced.notes)
    want = model(ids).logits
    assert ((fast(ids).logits - want).abs().max() / want.abs().max()).item() < 1e-4
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=5), theirs)


def test_compressed_tensors_checkpoint_of_a_state_space_model_loads_in_transformers(tmp_path):
    """Mamba-2's ``A_log`` reaches the graph as the folded ``-exp(A_log)`` and its convolution's
    kernel squeezed and unsqueezed: the checkpoint recovers both, and transformers loads it
    with lowbit's logits."""
    pytest.importorskip("compressed_tensors")
    import transformers as tf

    model = build_model("mamba2")
    q = lowbit.compile(model, (_prompt(2, 9),), recipe="w4a16-rtn", calibration=[(_prompt(2, 20),)], progress=False)
    q.save_pretrained(tmp_path / "ct")
    loaded, info = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", output_loading_info=True, quantization_config=tf.CompressedTensorsConfig(dequantize=True))
    assert not any(info.values()), info
    ids = _prompt(2, 30, seed=2)
    with torch.no_grad():
        got, want = loaded.eval()(ids).logits, q(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    mixer = loaded.backbone.layers[0].mixer
    assert torch.allclose(mixer.A_log, model.backbone.layers[0].mixer.A_log, atol=1e-6)
