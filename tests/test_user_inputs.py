"""Models and data as users hold them: default configs (``use_cache=True``), a tokenizer's
output as the example, calibration of mixed batch sizes and lengths as dicts, a DataLoader or
tuples, run-time shapes checked with clear messages, and a local transformers folder with a
text file on the command line."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf

import lowbit
from conftest import rel_err
from lowbit.cli import main
from lowbit.errors import InputError
from lowbit.zoo import minilm_path

SENTENCES = (Path(lowbit.__file__).parent / "data" / "sentences_calibration.txt").read_text().splitlines()


def _llama(vocab: int = 256) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # everything else default
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def encoder():
    return tf.AutoModel.from_pretrained(minilm_path()).eval()


def test_default_config_decoder_compiles_quantizes_and_serves_any_length():
    model = _llama()
    assert model.config.use_cache
    gen = torch.Generator().manual_seed(0)
    calibration = [(torch.randint(0, 256, (2, n), generator=gen),) for n in (7, 12, 20)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = lowbit.compile(model, (calibration[0][0][:1, :5],), recipe="w8a8", calibration=calibration,
                           progress=False)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert any("traced as one decode step" in n for n in q.traced.notes)
    assert model.config.use_cache
    for shape in [(1, 1), (3, 5), (2, 33)]:
        ids = torch.randint(0, 256, shape, generator=gen)
        out, ref = q(ids), model(ids)
        assert type(out) is type(ref) and list(out.keys()) == ["logits"]  # the model's output minus its cache
        assert rel_err(out.logits, ref.logits) < 0.1


@pytest.mark.parametrize("rope", [
    dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),  # branches in Python on the longest length seen
    dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=[2.0] * 8,
         original_max_position_embeddings=32),  # writes its choice into a buffer on every call
])
def test_rope_scaled_by_the_call_length_traces_and_matches_past_the_trained_positions(rope):
    """RoPE whose frequencies depend on the call's length (dynamic NTK, longrope: Phi-3.5 and
    Phi-4-mini) compiles and matches eager below and past the trained positions (32), decode
    steps included; the model's own buffers are left as they were."""
    sizes = dict(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, rope_parameters=rope)
    if rope["rope_type"] == "longrope":
        config = tf.Phi3Config(**sizes, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        config = tf.LlamaConfig(**sizes, max_position_embeddings=32)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    gen = torch.Generator().manual_seed(0)
    q = lowbit.compile(model, (torch.randint(0, 256, (2, 12), generator=gen),), progress=False)
    assert all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in buffers.items())
    for length in (20, 50, 100):
        ids = torch.randint(0, 256, (2, length), generator=gen)
        fresh = type(model)(config).eval()
        fresh.load_state_dict(state, strict=False)
        with torch.no_grad():
            ref = fresh(ids).logits
        assert rel_err(q(ids).logits, ref) < 1e-5, length
    prompt = torch.randint(0, 256, (1, 28), generator=gen)  # decoding across the 32 trained positions
    fresh = type(model)(config).eval()
    fresh.load_state_dict(state, strict=False)
    want = fresh.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(q.generate(prompt, max_new_tokens=12), want)


def test_tokenizer_output_as_example_and_calibration(encoder, tokenizer):
    enc = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    calibration = [tokenizer(SENTENCES[i:i + b], padding=True, return_tensors="pt")
                   for i, b in ((2, 1), (3, 4), (7, 3))]  # batch sizes 1, 4, 3, each its own length
    q = lowbit.compile(encoder, kwargs=enc, recipe="w8a8", calibration=calibration, progress=False)
    other = tokenizer(["An unseen sentence, longer than any of the calibration sentences were, by far, "
                       "to check the sequence dim is served past them."], return_tensors="pt")
    out, ref = q(**other), encoder(**other)
    cos = torch.nn.functional.cosine_similarity(out.last_hidden_state.mean(1), ref.last_hidden_state.mean(1))
    assert cos.item() > 0.99
    reordered = {k: other[k] for k in reversed(list(other.keys()))}  # keyword order does not matter
    assert torch.equal(q(**reordered).last_hidden_state, out.last_hidden_state)


def test_string_dims_need_no_bounds(encoder, tokenizer):
    """A dim named by a string is Dim.AUTO: torch.export infers BERT's 512-position limit."""
    enc = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    seq = {0: "batch", 1: "seq"}
    fast = lowbit.compile(encoder, (enc["input_ids"], enc["attention_mask"]), dynamic_shapes=(seq, seq))
    assert fast.traced.dim_ranges["seq"][1] == encoder.config.max_position_embeddings
    assert [v.tensor_type.shape for v in fast.graph.inputs] == [("batch", "seq"), ("batch", "seq")]
    ids = torch.randint(1000, 2000, (3, 40))
    mask = torch.ones_like(ids)
    assert rel_err(fast(ids, mask).last_hidden_state, encoder(ids, mask).last_hidden_state) < 1e-5


def test_dataloader_of_dicts_and_one_tensor_example(encoder, tokenizer):
    texts = SENTENCES[:12]
    loader = torch.utils.data.DataLoader(
        texts, batch_size=4, collate_fn=lambda b: dict(tokenizer(b, padding=True, return_tensors="pt")))
    example = tokenizer(texts[:2], padding=True, return_tensors="pt")
    q = lowbit.compile(encoder, example, recipe="w8a8-dynamic", calibration=loader, progress=False)
    assert q(**example).last_hidden_state.shape == encoder(**example).last_hidden_state.shape
    relu = lowbit.compile(torch.nn.ReLU(), torch.randn(3))  # one tensor is one positional argument
    assert torch.equal(relu(torch.tensor([-1.0, 2.0, 0.5])), torch.tensor([0.0, 2.0, 0.5]))


def test_shapes_that_cannot_be_served_are_named(encoder, tokenizer):
    fast = lowbit.compile(encoder, kwargs=tokenizer(SENTENCES[:2], padding=True, return_tensors="pt"))
    limit = encoder.config.max_position_embeddings
    too_long = {k: torch.ones(1, limit + 1, dtype=torch.long) for k in ("input_ids", "token_type_ids",
                                                                        "attention_mask")}
    with pytest.raises(InputError, match=rf"input input_ids dim 1 \(seq\) is {limit + 1}; the compiled model "
                                         rf"serves seq from 1 to {limit}"):
        fast(**too_long)
    with pytest.raises(InputError, match="expected a tensor of shape"):
        fast(input_ids=torch.ones(2, dtype=torch.long), token_type_ids=torch.ones(2, 3, dtype=torch.long),
             attention_mask=torch.ones(2, 3, dtype=torch.long))
    cnn = lowbit.compile(torch.nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 8, 8),))  # no dim named: static
    with pytest.raises(InputError, match=r"input args\[0\] dim 2 is 9, but the model was traced with this "
                                         r"dim fixed at 8"):
        cnn(torch.randn(2, 3, 9, 8))


def test_calibration_of_other_sizes_makes_dims_dynamic_and_other_keys_are_refused():
    conv = torch.nn.Conv2d(3, 4, 3)
    q = lowbit.compile(conv, (torch.randn(2, 3, 8, 8),), pipeline="fold-constants",
                       calibration=[(torch.randn(b, 3, s, s),) for b, s in ((1, 8), (3, 12))])
    assert any("differs between the example" in n for n in q.traced.notes)
    x = torch.randn(5, 3, 10, 10)
    assert torch.allclose(q(x), conv(x), atol=1e-5)
    model = _llama()
    with pytest.raises(InputError, match="calibration batch 1 has other keyword inputs than the example: "
                                         "missing attention_mask"):
        ids = torch.randint(0, 256, (2, 6))
        lowbit.compile(model, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                       recipe="w8a8", calibration=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                                   {"input_ids": ids}])


def test_one_trace_serves_several_recipes():
    model = _llama()
    calibration = [(torch.randint(0, 256, (2, n)),) for n in (7, 12)]
    traced = lowbit.trace(model, calibration[0])
    a = lowbit.compile(traced, recipe="w8a8", calibration=calibration, progress=False)
    b = lowbit.compile(model, calibration[0], recipe="w8a8", calibration=calibration, progress=False)
    ids = torch.randint(0, 256, (3, 9))
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not any(n.op.startswith("quant.") for n in traced.graph.nodes)  # the trace itself is untouched


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local transformers folder as a user has one: weights, config and tokenizer files."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = _llama(vocab=30522)  # the tokenizer's vocabulary
    model.save_pretrained(folder)
    for f in Path(minilm_path()).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    text = folder.parent / "calibration.txt"
    text.write_text("\n".join(SENTENCES[:40]) + "\n\n")
    return folder, text


def test_cli_exports_a_transformers_folder_with_text_calibration(model_dir, tmp_path, capfd):
    folder, text = model_dir
    code = main(["export", str(folder), "--recipe", "w8a8", "--calibration", str(text), "--samples", "24",
                 "--max-length", "16", "-o", str(tmp_path / "out")])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert "ONNX checker (full): passed" in out and "traced as one decode step" in out
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert "24 lines of" in err and "torchvision is not installed" not in err and "FutureWarning" not in err


def test_cli_calibration_errors_are_clear(model_dir, tmp_path, capsys):
    folder, _ = model_dir
    assert main(["inspect", str(folder), "--recipe", "w8a8", "--no-drift"]) == 0  # the example calibrates
    assert "give --calibration FILE" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert main(["inspect", str(folder), "--recipe", "w8a8", "--calibration", str(empty)]) == 2
    assert "has no non-blank line" in capsys.readouterr().err
    assert main(["inspect", "tiny-cnn", "--recipe", "w8a8", "--calibration", str(empty)]) == 2
    assert "the model has no tokenizer" in capsys.readouterr().err


def test_cli_writes_a_compressed_tensors_folder_with_the_tokenizer(model_dir, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    folder, text = model_dir
    out = tmp_path / "ct"
    assert main(["export", str(folder), "--pipeline", "insert-qdq{weights=int4/group32/sym}", "--calibration",
                 str(text), "--samples", "8", "--max-length", "16", "--format", "compressed-tensors",
                 "-o", str(out)]) == 0
    assert "max |diff| 0.00e+00" in capsys.readouterr().out  # transformers loads it, same logits
    copied = {f.name for f in folder.iterdir() if f.name.startswith(("tokenizer", "vocab", "special_tokens"))}
    assert copied and copied <= {f.name for f in out.iterdir()}
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello world")["input_ids"] == tf.AutoTokenizer.from_pretrained(folder)(
        "hello world")["input_ids"]
