"""transformers architectures as users hold them, built from small configs, and the coverage
matrix that checks what lowbit does with each.

Every family is its transformers model class built from its config class with only the sizes
made small (width, depth, heads, vocabulary, image size, a scan's chunk); every other setting
keeps its default, ``use_cache=True`` included. ``run_family`` runs the matrix's cells on one family:

- ``compile``: ``lowbit.compile`` equal to eager (≤ 1e-4 relative) at the example and at
  another batch size and length;
- ``w8a8``: calibrated on batches of three lengths (vision: three batch sizes), run at a
  fourth; ``w4a16``: the same with int4 AWQ weights; ``rotation``: ``w8a8-rot``; in each,
  every linear and MoE expert weight but the output head's is quantized;
- ``onnx``: the ``w8a8`` model exported, run by ONNX Runtime at two shapes against the torch
  backend; ``triton``: ``w8a8`` on the triton backend (the interpreter on a CPU) against the
  torch backend;
- ``generate`` (causal LMs): greedy tokens equal transformers' ``generate``, and the ``w8a8``
  model generates with an int8 key/value cache.

A cell is ✅, a note (what lowbit said it could not do, e.g. a rotation that does not apply),
or a failure. ``scripts/models_table.py`` writes the matrix to ``docs/models.md``;
``tests/test_families.py`` asserts it.

    spec = build_family("qwen2")          # a ModelSpec: model, example, dynamic shapes
    cells = run_family("qwen2", tmpdir)   # {"compile": Cell("ok", ...), ...}
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TEXT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
             intermediate_size=96)
_DECODER = dict(_TEXT, num_key_value_heads=2)
_VIT = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96)


@dataclass(frozen=True)
class Family:
    """One architecture: its transformers model and config classes, the sizes that make it
    small, and the kind of input it reads (``tokens``, ``image`` or ``audio``)."""

    name: str
    model: str
    config: str
    sizes: dict = field(default_factory=dict)
    inputs: str = "tokens"



def _decoder(name: str, prefix: str, **extra) -> Family:
    return Family(name, f"{prefix}ForCausalLM", f"{prefix}Config", dict(_DECODER, **extra), "ids")


FAMILIES: dict[str, Family] = {f.name: f for f in [
    _decoder("llama", "Llama", head_dim=16),
    _decoder("qwen2", "Qwen2"),
    _decoder("qwen3", "Qwen3", head_dim=16),
    _decoder("mistral", "Mistral", head_dim=16),
    _decoder("mixtral", "Mixtral", head_dim=16, num_local_experts=4),
    _decoder("gemma", "Gemma", head_dim=16),
    _decoder("gemma2", "Gemma2", head_dim=16),
    Family("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", dict(_DECODER, head_dim=16), "ids"),
    _decoder("phi3", "Phi3"),
    _decoder("cohere", "Cohere", head_dim=16),
    _decoder("gpt-oss", "GptOss", head_dim=16, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
             sliding_window=8, layer_types=["sliding_attention", "full_attention"]),  # a window shorter than
    # generate's test run
    Family("opt", "OPTForCausalLM", "OPTConfig", dict(_TEXT, ffn_dim=96, word_embed_proj_dim=64), "ids"),
    Family("gpt-neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_TEXT), "ids"),
    Family("gpt2", "GPT2LMHeadModel", "GPT2Config", dict(_TEXT, n_inner=96), "ids"),
    Family("falcon", "FalconForCausalLM", "FalconConfig", dict(_TEXT), "ids"),
    Family("bloom", "BloomForCausalLM", "BloomConfig", dict(vocab_size=256, hidden_size=64, n_layer=1, n_head=4), "ids"),
    _decoder("stablelm", "StableLm"),
    _decoder("olmo", "Olmo"),
    _decoder("qwen3-moe", "Qwen3Moe", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
    _decoder("deepseek-v3", "DeepseekV3", num_key_value_heads=4, moe_intermediate_size=48, n_routed_experts=4,
             num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=32,
             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),  # multi-head latent
    # attention; its key heads equal its query heads, as in the released configs
    _decoder("deepseek-v2", "DeepseekV2", num_key_value_heads=4, moe_intermediate_size=48, n_routed_experts=4,
             num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=32,
             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),  # rotary embeddings
    # as complex products (polar, view_as_complex), traced as pairs of real tensors
    Family("llama4", "Llama4ForCausalLM", "Llama4TextConfig", dict(_DECODER, head_dim=16, num_local_experts=4,
                                                                    intermediate_size_mlp=96), "ids"),  # complex
    # rotary embeddings too; MoE beside a shared expert, chunked attention
    _decoder("phi", "Phi"),  # partial rotary, attention and MLP in parallel off one norm
    _decoder("olmoe", "Olmoe", num_experts=4, num_experts_per_tok=2),
    _decoder("qwen2-moe", "Qwen2Moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
             shared_expert_intermediate_size=48),  # routed experts and a gated shared expert
    _decoder("granitemoe", "GraniteMoe", num_local_experts=4, num_experts_per_tok=2),
    Family("jetmoe", "JetMoeForCausalLM", "JetMoeConfig", dict(_TEXT, num_local_experts=4, num_experts_per_tok=2,
                                                                kv_channels=16), "ids"),  # experts indexed W[i],
    # attention heads as experts too
    # recurrent layers, their states in the cache beside attention's keys and values:
    _decoder("lfm2", "Lfm2", num_hidden_layers=2, layer_types=["conv", "full_attention"]),  # short convolutions
    Family("mamba2", "Mamba2ForCausalLM", "Mamba2Config", dict(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                                state_size=8, num_heads=8, head_dim=16, n_groups=1,
                                                                chunk_size=16), "ids"),  # state-space layers only
    # (no attention); chunks of 16, so that the calibration and test prompts span several
    _decoder("falcon-h1", "FalconH1", mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
             mamba_n_groups=1, mamba_chunk_size=16),  # a Mamba-2 mixer and attention side by side in every layer
    _decoder("granitemoehybrid", "GraniteMoeHybrid", num_hidden_layers=2, layer_types=["mamba", "attention"],
             mamba_d_state=8, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, num_local_experts=4,
             num_experts_per_tok=2, shared_intermediate_size=32, mamba_chunk_size=16),  # Granite 4: Mamba-2
    # and attention layers, MoE
    _decoder("nemotron-h", "NemotronH", num_hidden_layers=3, layers_block_type=["mamba", "attention", "mlp"],
             ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=32, n_groups=1, chunk_size=16),
    Family("bert", "BertModel", "BertConfig", dict(_TEXT)),
    Family("roberta", "RobertaModel", "RobertaConfig", dict(_TEXT)),
    Family("distilbert", "DistilBertModel", "DistilBertConfig",
           dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=96)),
    Family("deberta-v2", "DebertaV2Model", "DebertaV2Config", dict(_TEXT)),
    Family("electra", "ElectraModel", "ElectraConfig", dict(_TEXT, embedding_size=32)),
    Family("modernbert", "ModernBertModel", "ModernBertConfig", dict(_TEXT)),
    Family("t5-encoder", "T5EncoderModel", "T5Config",
           dict(vocab_size=256, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)),
    Family("vit", "ViTModel", "ViTConfig", dict(_VIT), "image"),
    Family("deit", "DeiTModel", "DeiTConfig", dict(_VIT), "image"),
    Family("siglip-vision", "SiglipVisionModel", "SiglipVisionConfig", dict(_VIT), "image"),
    Family("swin", "SwinModel", "SwinConfig", dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1],
                                                   num_heads=[2, 2], window_size=4), "image"),
    Family("convnext", "ConvNextModel", "ConvNextConfig", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
           "image"),
    Family("resnet", "ResNetModel", "ResNetConfig", dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),
           "image"),
    Family("t5", "T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=256, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4), "seq2seq"),
    Family("bart", "BartForConditionalGeneration", "BartConfig",
           dict(vocab_size=256, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96), "seq2seq"),
    Family("marian", "MarianMTModel", "MarianConfig",
           dict(vocab_size=256, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96), "seq2seq"),
    Family("whisper", "WhisperForConditionalGeneration", "WhisperConfig",
           dict(vocab_size=256, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=16,
                max_source_positions=16, max_target_positions=32), "audio-seq2seq"),
    Family("wav2vec2", "Wav2Vec2ForCTC", "Wav2Vec2Config",
           dict(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4), "waveform"),  # convolutions over samples of any length
    Family("whisper-encoder", "WhisperForAudioClassification", "WhisperConfig",
           dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96,
                num_mel_bins=16, max_source_positions=16, classifier_proj_size=32), "audio"),
]}


def _config(family: Family):
    import transformers as tf

    cls = getattr(tf, family.config)
    defaults, vocab = cls(), family.sizes.get("vocab_size")
    ids = {key: vocab - 1 for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
           if vocab and isinstance(getattr(defaults, key, None), int) and getattr(defaults, key) >= vocab}
    return cls(**family.sizes, **ids)  # a default token id past the small vocabulary moves inside it


def build_model(name: str) -> torch.nn.Module:
    """Family ``name``'s model with random weights (seeded)."""
    import transformers as tf

    family = FAMILIES[name]
    torch.manual_seed(0)
    return getattr(tf, family.model)(_config(family)).eval()


def make_inputs(model: torch.nn.Module, kind: str, batch: int, length: int, seed: int = 0):
    """A call as a user would make it: token ids (and a padded attention mask, as a tokenizer
    gives it) for text, the ids alone for ``ids`` (a decoder's prompt), pixels for images,
    log-mel features for audio (``length`` is then the batch size's stand-in: audio and image
    sizes are fixed by the config), a waveform of a length that grows with ``length`` for
    ``waveform``; ``seq2seq`` and ``audio-seq2seq`` add an encoder-decoder's
    ``decoder_input_ids``, about half as long as the text."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    if kind == "image":
        size = getattr(config, "image_size", 32)
        return (torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=gen),)

    def target():  # drawn after the encoder's inputs, which stay as they were drawn before
        return torch.randint(0, config.vocab_size, (batch, length // 2 + 1), generator=gen)

    if kind == "waveform":  # raw audio of 400 + 40·length samples
        return {"input_values": torch.randn(batch, 400 + 40 * length, generator=gen)}
    if kind.startswith("audio"):
        frames = 2 * config.max_source_positions
        features = torch.randn(batch, config.num_mel_bins, frames, generator=gen)
        return (features,) if kind == "audio" else {"input_features": features, "decoder_input_ids": target()}
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=gen)
    if kind == "ids":
        return (ids,)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, length - length // 3:] = 0  # the last row padded, as a tokenizer pads a batch
    call = {"input_ids": ids, "attention_mask": mask}
    return call if kind == "tokens" else dict(call, decoder_input_ids=target())


def build_family(name: str):
    """Family ``name`` as a ``lowbit.zoo.ModelSpec``: the model and an example call (text: two
    sequences of 9 tokens; the batch and sequence dims are dynamic by default)."""
    from lowbit.zoo import ModelSpec

    family = FAMILIES[name]
    model = build_model(name)
    example = make_inputs(model, family.inputs, 2, 9)
    args, kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
    return ModelSpec(model, args, None, kwargs, description=f"{family.model}, small config, random weights")


# ---- the coverage matrix -------------------------------------------------------------------

CELLS = ("compile", "w8a8", "w4a16", "rotation", "onnx", "triton", "generate")
NOT_APPLICABLE = "not a causal LM"  # a cell that does not apply to the family (generate, for encoders)
ENCODER_DECODER = ("an encoder-decoder: compiled for whole calls (encoder and decoder together, as training and "
                   "scoring call it); generate() and its cache are for decoder-only LMs")
BOUNDS = {"w8a8": 0.15, "w4a16": 0.35, "rotation": 0.15}  # relative L2 error vs eager, random weights


@dataclass
class Cell:
    status: str  # "ok", "note", "fail" or "na" (the cell does not apply)
    text: str = ""

    def mark(self) -> str:
        if self.status == "na":
            return "—"
        return {"ok": "✅", "note": "note", "fail": "❌"}[self.status] + (f": {self.text}" if self.text else "")


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _tensors(out) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def relative_error(got, want) -> float:
    """Worst relative L2 error over the output tensors; a different structure is an error."""
    a, b = _tensors(got), _tensors(want)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise AssertionError(f"outputs differ in structure: {[tuple(x.shape) for x in a]} vs "
                             f"{[tuple(y.shape) for y in b]}")
    return max(((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()
               for x, y in zip(a, b))


_TEXT_KINDS = ("tokens", "ids", "seq2seq")


@dataclass
class _Run:
    """What the cells of one family share: the model, its calls, the compiled ``w8a8`` model."""

    name: str
    family: Family
    model: torch.nn.Module
    workdir: Path
    quantized: object = None
    traced: object = None  # the fp32 trace the later cells compile again (tracing is the slow part)

    def inputs(self, batch: int, length: int, seed: int = 0):
        return make_inputs(self.model, self.family.inputs, batch, length, seed)

    def example(self):
        return self.inputs(2, 9)

    def calibration(self) -> list:
        if self.family.inputs in _TEXT_KINDS:
            return [self.inputs(2, n, seed=i + 1) for i, n in enumerate((7, 12, 20))]
        return [self.inputs(b, 9 + 2 * b, seed=b) for b in (1, 2, 3)]

    def fourth(self):
        return self.inputs(3, 5, seed=9) if self.family.inputs in _TEXT_KINDS else self.inputs(4, 7, seed=9)

    def compile(self, from_model: bool = False, **options):
        """``lowbit.compile`` on the model (``from_model``) or on the trace the compile cell made."""
        import lowbit

        if self.traced is not None and not from_model:
            return lowbit.compile(self.traced, progress=False, **options)
        example = self.example()
        args, kwargs = ((), example) if isinstance(example, dict) else (example, None)
        return lowbit.compile(self.model, args, kwargs=kwargs, progress=False, **options)

    def quantized_error(self, compiled) -> float:
        return relative_error(_call(compiled, self.fourth()), _call(self.model, self.fourth()))


def _cell_compile(run: _Run) -> str:
    compiled = run.compile(from_model=True)
    run.traced = compiled.traced
    for inputs in (run.example(), run.inputs(1, 13, seed=5)):
        err = relative_error(_call(compiled, inputs), _call(run.model, inputs))
        if err > 1e-4:
            raise AssertionError(f"relative error {err:.1e} vs eager")
    return ""


def _quantized(run: _Run, recipe: str, from_model: bool = False) -> tuple[object, str]:
    compiled = run.compile(from_model, recipe=recipe, calibration=run.calibration())
    if not any(n.op.startswith("quant.") for n in compiled.graph.nodes):
        said = [n for n in compiled.traced.notes if "stay float" in n]
        if not said:
            raise AssertionError(f"{recipe} left no quantized op and said nothing")
        return compiled, said[0]
    left = _float_layers(compiled)
    if left:
        raise AssertionError(f"{recipe} left {len(left)} layer weight(s) float: {', '.join(left[:4])}")
    err = run.quantized_error(compiled)
    bound = BOUNDS.get(recipe.split("-")[0], BOUNDS.get(recipe, 0.15))
    if err > bound:
        raise AssertionError(f"relative error {err:.3f} vs eager, above {bound}")
    return compiled, ""


def _float_layers(compiled) -> list[str]:
    """The layers (linears and MoE experts, the output head aside) that read a float constant
    weight after quantization: a recipe quantizes every one or says why not."""
    from lowbit.passes.quantize import output_heads
    from lowbit.quant.experts import GROUPED_MM

    graph = compiled.graph
    heads = output_heads(graph)
    return [n.loc.module or n.results[0].name for n in graph.nodes
            if (n.op == "core.linear" or n.op in GROUPED_MM) and id(n) not in heads
            and graph.is_constant(n.operands[1]) and graph.tensor(n.operands[1]).is_floating_point()]


def _cell_w8a8(run: _Run) -> str:
    # A decoder as users call it: lowbit.compile(model, (ids,), calibration=...) traced afresh;
    # the other families reuse the compile cell's trace (tracing is most of a cell's time).
    run.quantized, note = _quantized(run, "w8a8", from_model=run.family.inputs == "ids")
    return note


def _cell_w4a16(run: _Run) -> str:
    return _quantized(run, "w4a16")[1]


def _cell_rotation(run: _Run) -> str:
    compiled, note = _quantized(run, "w8a8-rot")
    said = [n for n in compiled.traced.notes if any(p in n for p in ("fuse-norms", "rotate-residual"))]
    return "; ".join(said) or note


def _cell_onnx(run: _Run) -> str:
    from lowbit.backends.onnx import compare_with_torch

    compiled = run.quantized or _quantized(run, "w8a8")[0]
    path, _ = compiled.export_onnx(run.workdir / f"{run.name}.onnx")
    for inputs in (run.example(), run.fourth()):
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {})
        diff = compare_with_torch(path, compiled, compiled.traced.flatten_inputs(args, kwargs))
        if diff["cosine"] < 0.999:
            raise AssertionError(f"ONNX Runtime vs torch backend: cosine {diff['cosine']:.5f}")
    return ""


def _cell_triton(run: _Run) -> str:
    reference = run.quantized or _quantized(run, "w8a8")[0]
    compiled = run.compile(recipe="w8a8", calibration=run.calibration(), backend="triton")
    if not compiled.kernel_nodes():
        if not any(n.op == "core.linear" for n in run.traced.graph.nodes):
            return "no linear layer: the quantized convolutions run their torch reference (no Triton kernel)"
        raise AssertionError("no node runs a Triton kernel")
    err = relative_error(_call(compiled, run.fourth()), _call(reference, run.fourth()))
    if err > 1e-2:  # kernel and reference sum in other orders: a value on a rounding edge may flip
        raise AssertionError(f"triton vs torch backend: relative error {err:.1e}")
    return ""


def _cell_generate(run: _Run) -> str:
    """Greedy tokens of the fp32 trace equal transformers' ``generate``; the ``w8a8`` model with
    an int8 key/value cache generates from a cache of fewer bytes."""
    if run.family.inputs.endswith("seq2seq"):
        return ENCODER_DECODER
    if run.family.inputs != "ids":
        return NOT_APPLICABLE
    fast = run.compile()
    if fast.traced.decoder is None:
        raise AssertionError("traced without its cache: " + "; ".join(n for n in fast.traced.notes if "cache" in n))
    (prompt,) = run.inputs(2, 6, seed=3)
    ours = fast.generate(prompt, max_new_tokens=12)
    with torch.no_grad():
        theirs = run.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                    do_sample=False)
    if not torch.equal(ours, theirs):
        raise AssertionError(f"greedy tokens differ from transformers': {ours[0, 6:].tolist()} vs "
                             f"{theirs[0, 6:].tolist()}")
    quantized = run.quantized or _quantized(run, "w8a8")[0]
    import lowbit

    if fast.cache_bytes_per_token() == 0:
        return "no attention layer: the cache is the recurrent layers' states, which stay float"
    q = lowbit.compile(quantized.traced, kv_cache="int8", calibration=run.calibration(), progress=False)
    if q.generate(prompt, max_new_tokens=4).shape[1] < 7 or q.cache_bytes_per_token() >= fast.cache_bytes_per_token():
        raise AssertionError("the int8 cache did not generate from a smaller cache")
    return ""


_CHECKS: dict[str, Callable[[_Run], str]] = {
    "compile": _cell_compile, "w8a8": _cell_w8a8, "w4a16": _cell_w4a16,
    "rotation": _cell_rotation, "onnx": _cell_onnx, "triton": _cell_triton, "generate": _cell_generate}


def run_family(name: str, workdir: str | os.PathLike, cells: tuple[str, ...] = CELLS) -> dict[str, Cell]:
    """Run the matrix's ``cells`` on family ``name`` (ONNX files go to ``workdir``)."""
    try:
        run = _Run(name, FAMILIES[name], build_model(name), Path(workdir))
    except Exception as e:  # the config or the model class is refused by this transformers
        return {cell: Cell("fail", f"building the model: {type(e).__name__}: {e}"[:300]) for cell in cells}
    results = {}
    for cell in cells:
        try:
            note = _CHECKS[cell](run)
            results[cell] = Cell("na") if note == NOT_APPLICABLE else Cell("note" if note else "ok", note)
        except Exception as e:  # a cell's failure is its result, the other cells still run
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            results[cell] = Cell("fail", f"{type(e).__name__}: {first[:300]}")
    return results
