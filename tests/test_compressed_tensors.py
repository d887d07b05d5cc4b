"""compiled.save_pretrained(dir, format="compressed-tensors"): folders transformers loads (with
compressed-tensors installed) with no missing or unexpected keys, whose logits equal lowbit's
torch backend on the same quantized model; and refusals for what the format cannot hold."""

import json

import pytest
import torch

import lowbit
from lowbit import zoo
from lowbit.backends.compressed_tensors import ExportError, pack_int32
from lowbit.backends.torch import CompiledModule
from lowbit.families import build_model, make_inputs
from lowbit.ir.dialects import quant

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


def _calibration():
    return [(zoo._token_inputs(256, seed=i),) for i in range(4)]


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _compile(model, pipeline, **kw):
    return lowbit.compile(model, (zoo._token_inputs(256),), pipeline=pipeline, calibration=_calibration(),
                          progress=False, **kw)


def _load(folder, dequantize: bool = False):
    """transformers' own loader. ``dequantize=True`` takes compressed-tensors' dequantizing route,
    which asymmetric pack-quantized folders need: on the default route transformers builds the
    zero point's buffer unpacked and refuses the packed one (a compressed-tensors limitation, the
    same for llm-compressor's asymmetric checkpoints)."""
    kw = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kw)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = zoo._token_inputs(256, batch=2, seq=7, seed=5)
WEIGHT_ONLY = [  # (model, weights spec, dequantizing route): sym and asym, group 128 and 32
    ("llama", "int4/group128/sym", False),
    ("llama", "int4/group32/sym", False),
    ("llama", "int4/group128/asym", True),
    ("qwen2", "int4/group32/asym", True),
    ("qwen2", "int8/channel/sym", False),
]


@pytest.mark.parametrize("family,weights,dequantize", WEIGHT_ONLY)
def test_weight_only_folders_load_in_transformers_bit_exact(family, weights, dequantize, tmp_path):
    model = _qwen2() if family == "qwen2" else zoo.tiny_llama(layers=2, hidden=256).model
    q = _compile(model, f"insert-qdq{{weights={weights}}}")
    folder = q.save_pretrained(tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    bits, kind = int(weights[3]), weights.split("/")[1]
    assert config["format"] == group["format"] == "pack-quantized" and group["weights"]["num_bits"] == bits
    assert group["weights"]["strategy"] == ("channel" if kind == "channel" else "group")
    assert group["weights"]["symmetric"] == weights.endswith("/sym") and config["ignore"] == ["lm_head"]
    assert torch.equal(_logits(_load(folder, dequantize), IDS), q(IDS).logits)


@pytest.mark.parametrize("recipe,fmt", [("fp8", "float-quantized"), ("w8a8-static", "int-quantized")])
def test_static_activations_are_bit_exact(recipe, fmt, tmp_path):
    """fp8 (e4m3 weights and activations) and w8a8-static (SmoothQuant folded, uint8 asymmetric
    activations stored as signed int8 with a shifted zero point)."""
    q = _compile(zoo.tiny_llama(layers=2).model, None, recipe=recipe)
    folder = q.save_pretrained(tmp_path / "ct")
    (group,) = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["format"] == fmt and group["input_activations"]["strategy"] == "tensor"
    assert group["input_activations"]["symmetric"] == (recipe == "fp8")
    assert torch.equal(_logits(_load(folder), IDS), q(IDS).logits)


def test_dynamic_int8_activations_differ_only_by_the_scale_convention(tmp_path, monkeypatch):
    """compressed-tensors' own (fake) per-token quantization in transformers takes the scale
    max|x|/127.5; lowbit, like vLLM's int8 kernel, max|x|/127. With lowbit's reference switched
    to 127.5 the logits agree; the weights are bit-exact either way."""
    q = _compile(_qwen2(), None, recipe="w8a8-dynamic")
    folder = q.save_pretrained(tmp_path / "ct")
    (group,) = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["format"] == "int-quantized" and group["input_activations"]["dynamic"] is True
    theirs = _logits(_load(folder), IDS)
    ours = q(IDS).logits
    rel = ((theirs - ours).norm() / ours.norm()).item()
    assert rel < 2e-2
    reference = quant.dynamic_quantize

    def all_codes(input, *, dtype, symmetric, clip=1.0):  # compressed-tensors' symmetric range: max / ((qmax − qmin) / 2)
        assert clip == 1.0  # the format has no clip ratio
        if dtype.is_float or not symmetric:
            return reference(input, dtype=dtype, symmetric=symmetric)
        qmin, qmax = dtype.int_range
        scale = (input.float().abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)).clamp_min(quant.EPS)
        q = torch.round(input.float() / scale).clamp(qmin, qmax)
        return q.to(dtype.storage), scale, torch.zeros_like(scale).to(dtype.storage)

    monkeypatch.setattr(quant, "dynamic_quantize", all_codes)
    same = CompiledModule(q.traced, pack=False)(IDS).logits
    assert ((theirs - same).norm() / same.norm()).item() < 1e-5 < rel


def test_a_width_that_is_not_a_power_of_two(tmp_path):
    spec = zoo.byte_llama_192()  # hidden 192, MLP 528
    q = lowbit.compile(spec.model, spec.example_inputs, pipeline="insert-qdq{weights=int4/group16/sym}",
                       calibration=[spec.example_inputs] * 2, progress=False)
    folder = q.save_pretrained(tmp_path / "ct")
    ids = spec.example_inputs[0]
    assert torch.equal(_logits(_load(folder), ids), q(ids).logits)


def test_folded_rotation_and_norms_export_as_plain_weights(tmp_path):
    q = _compile(zoo.tiny_llama(layers=2, hidden=64).model,
                 "fuse-norms,rotate-residual,insert-qdq{weights=int4/group32/sym}")
    folder = q.save_pretrained(tmp_path / "ct")
    loaded = _load(folder)
    assert torch.equal(loaded.model.norm.weight, torch.ones(64))  # the norm's scale is in lm_head now
    assert torch.equal(_logits(loaded, IDS), q(IDS).logits)


def test_online_hadamards_are_written_as_the_transform_config(tmp_path):
    """QuaRot-style rotation with online Hadamards before o_proj and down_proj: the folder's
    transform_config names them; transformers ignores it on CPU (logits far off), and with
    compressed-tensors' own helper applying its online part the logits are lowbit's."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    q = _compile(zoo.tiny_llama(layers=2, hidden=64).model,
                 "fuse-norms,rotate-residual,online-hadamard,insert-qdq{weights=int4/group32/sym}",
                 rotation="always")
    folder = q.save_pretrained(tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]["transform_config"]
    targets = {name: scheme["apply"][0]["targets"] for name, scheme in config["config_groups"].items()}
    assert targets == {"hadamard_64": [f"model.layers.{i}.self_attn.o_proj" for i in range(2)],
                       "hadamard_128": [f"model.layers.{i}.mlp.down_proj" for i in range(2)]}
    model, want = _load(folder), q(IDS).logits
    rel = lambda got: ((got - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(_logits(model, IDS)) > 0.1
    transforms = TransformConfig.model_validate(config)
    for scheme in transforms.config_groups.values():  # the weight-side inverse is in the saved weights
        scheme.apply = [a for a in scheme.apply if a.is_online()]
    apply_transform_config(model, transforms)
    assert rel(_logits(model, IDS)) < 1e-5


def _family(name, pipeline):
    """A transformers family's tiny model compiled with ``pipeline``, and a prompt."""
    model = build_model(name)
    ids = make_inputs(model, "ids", 2, 9)
    q = lowbit.compile(model, ids, pipeline=pipeline, calibration=[ids], progress=False)
    return q, make_inputs(model, "ids", 1, 6, seed=9)[0]


@pytest.mark.parametrize("family", ["falcon", "bloom"])
def test_channel_and_grouped_layers_are_written_in_one_group_size(family, tmp_path):
    """group128 on a model 64 wide: lowbit holds the 64-input layers per channel and the
    256-input dense_4h_to_h in groups of 128. transformers' dequantizing route reads every
    layer with the first config group's scheme, so the folder holds all four in groups of 64
    (each scale and zero point repeated): one scheme, and the same logits."""
    q, prompt = _family(family, "insert-qdq{weights=int4/group128/asym}")
    folder = q.save_pretrained(tmp_path / "ct")
    (group,) = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert (group["weights"]["strategy"], group["weights"]["group_size"], len(group["targets"])) == ("group", 64, 4)
    assert torch.equal(_logits(_load(folder, dequantize=True), prompt), q(prompt).logits)


def test_a_quantized_conv1d_is_refused_and_a_float_one_is_written_transposed(tmp_path):
    """GPT-2's layers are transformers' Conv1D (weight [in, out]): written in nn.Linear's
    [out, in] layout transformers refuses three of them and loads the square attn.c_proj
    transposed, so a quantized one is refused; left float, they are written as Conv1D holds them."""
    q, _ = _family("gpt2", "insert-qdq{weights=int4/group32/sym}")
    with pytest.raises(ExportError, match=r"^transformer\.h\.0\.attn\.c_attn is a Conv1D \(weight stored \[64, "
                       r"192\], \[in, out\], for its 64 inputs and 192 outputs\), not an nn\.Linear: compressed-"
                       r"tensors quantizes nn\.Linear layers, whose weight is \[out, in\].*export_onnx"):
        q.save_pretrained(tmp_path / "quantized")
    assert not any(tmp_path.iterdir())
    q, prompt = _family("gpt2", "insert-qdq{weights=int4/group32/sym,skip=transformer.h.*,head=true}")
    folder = q.save_pretrained(tmp_path / "head")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "targets"] == ["lm_head"]
    # float Conv1D computes addmm(x, W), lowbit's linear x·Wᵀ: the same sums, rounded apart
    torch.testing.assert_close(_logits(_load(folder), prompt), q(prompt).logits, rtol=0, atol=1e-6)


def test_gpt_oss_sinks_and_routers(tmp_path):
    """gpt-oss's attention sinks ([heads], read as [1, heads, 1, 1]) are folded into a constant
    named after them, and written; its routers (not nn.Linear, which is all compressed-tensors
    quantizes) are written dequantized, in float. The experts are left float here."""
    q, prompt = _family("gpt-oss", "insert-qdq{weights=int4/group32/sym,skip=*.experts}")
    folder = q.save_pretrained(tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head", "model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    model = _load(folder)
    reference = build_model("gpt-oss")  # the same seeded weights the compiled model was traced from
    assert torch.equal(model.model.layers[1].self_attn.sinks, reference.model.layers[1].self_attn.sinks)
    assert torch.equal(_logits(model, prompt), q(prompt).logits)


@pytest.mark.parametrize("family,key", [("qwen3-moe", "model.layers.0.mlp.experts.3.up_proj"),
                                        ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w3")])
def test_moe_experts_are_written_one_linear_per_expert(family, key, tmp_path):
    """The stacked experts lowbit quantized are written as the hub's checkpoints hold them (one
    nn.Linear per expert and projection, named as transformers saves them), and transformers
    stacks them back: on both routes the logits are lowbit's."""
    from safetensors import safe_open

    q, prompt = _family(family, "insert-qdq{weights=int4/group16/sym}")
    folder = q.save_pretrained(tmp_path / "ct")
    (group,) = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert key in group["targets"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f"{key}.weight_packed" in f.keys() and not any(k.endswith("gate_up_proj") for k in f.keys())
    for dequantize in (False, True):  # eager transformers runs torch's grouped matmul kernel, the graph its
        # loop fallback: the same products, summed apart
        torch.testing.assert_close(_logits(_load(folder, dequantize), prompt), q(prompt).logits, rtol=0, atol=1e-6)


def test_moe_experts_the_format_cannot_hold_are_refused(tmp_path):
    """Experts with zero points (transformers dequantizes experts without them), and experts
    transformers saves stacked (gpt-oss): refused with what to do, and nothing written."""
    q, _ = _family("qwen3-moe", "insert-qdq{weights=int4/group16/asym}")
    with pytest.raises(ExportError, match=r"zero points.*weights_override=\*\.experts>int4/group128/sym"):
        q.save_pretrained(tmp_path / "asym")
    q, _ = _family("gpt-oss", "insert-qdq{weights=int4/group32/sym}")
    with pytest.raises(ExportError, match=r"one stacked tensor \(model\.layers\.0\.mlp\.experts\.gate_up_proj\).*"
                       r"skip=\*\.experts"):
        q.save_pretrained(tmp_path / "stacked")
    assert not any(tmp_path.iterdir())


def test_packing_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        values = torch.randint(lo, hi + 1, (12, 40), generator=gen).to(torch.int8)
        for dim in (0, 1):
            assert torch.equal(pack_int32(values, bits, dim), pack_to_int32(values, bits, packed_dim=dim))


@pytest.mark.slow
def test_byte_llama_perplexity_through_transformers(tmp_path):
    from lowbit.evaluate import byte_windows, perplexity

    spec = zoo.byte_llama()  # the w4a16 recipe: AWQ scales folded, int4 asymmetric groups of 128
    q = lowbit.compile(spec.model, spec.example_inputs, recipe="w4a16", calibration=byte_windows("calib")[:2],
                       progress=False)
    loaded = _load(q.save_pretrained(tmp_path / "ct"), dequantize=True)
    windows = byte_windows("val")[:4]
    assert f"{perplexity(loaded, windows):.4f}" == f"{perplexity(q, windows):.4f}"


def test_what_the_format_cannot_hold_is_refused(tmp_path):
    llama = zoo.tiny_llama(layers=1, hidden=64).model
    spec = zoo.byte_llama_192()  # online Hadamards of 192 = 3·64 (no Sylvester matrix) before q/k/v first
    rotated = lowbit.compile(spec.model, spec.example_inputs, progress=False, calibration=[spec.example_inputs],
                             pipeline="online-hadamard,insert-qdq{weights=int4/group16/sym}")
    with pytest.raises(ExportError, match="q_proj.*rotate.hadamard rotation that compressed-tensors"):
        rotated.save_pretrained(tmp_path / "a")
    with pytest.raises(ExportError, match="key/value cache"):
        _compile(llama, "insert-qdq{weights=int4/group32/sym}", kv_cache="int8").save_pretrained(tmp_path / "b")
    with pytest.raises(ExportError, match=r"q_proj: its per-token activation range is clipped to 0\.\d+ of each"):
        _compile(llama, "insert-qdq{weights=int8/channel,acts=int4/token/dynamic/mse}").save_pretrained(tmp_path / "e")
    with pytest.raises(ExportError, match="nothing for compressed-tensors to hold"):
        _compile(llama, None).save_pretrained(tmp_path / "c")
    spec = zoo.tiny_vit()
    encoder = lowbit.compile(spec.model, spec.example_inputs, pipeline="insert-qdq{weights=int8/channel}",
                             calibration=[spec.example_inputs], progress=False)
    with pytest.raises(ExportError, match="causal LMs"):
        encoder.save_pretrained(tmp_path / "d")
    q = _compile(llama, "insert-qdq{weights=int4/group32/sym}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not an empty folder"):
        q.save_pretrained(tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written


def test_cli_writes_and_checks_a_folder(tmp_path, capsys):
    from lowbit.cli import main

    assert main(["export", "byte-llama-192", "--pipeline", "insert-qdq{weights=int4/group16/asym}",
                 "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    out = capsys.readouterr().out
    assert "config.json" in out and "model.safetensors" in out
    diff = float(out.split("transformers vs lowbit torch backend")[1].split("max |diff| ")[1].split(",")[0])
    assert diff == 0.0
