"""A compiled causal LM as a folder ONNX Runtime GenAI loads: ``model.onnx`` (+ ``.data``), a
``genai_config.json`` and the tokenizer's files.

    q = lowbit.compile(model, (ids,), recipe="w4a16", calibration=batches)
    lowbit.backends.onnx.genai.export_genai(q.traced, "out/", tokenizer=tokenizer)
    # onnxruntime_genai.Model("out/") generates with it

The decoder is the decode-step graph (``lowbit.frontend.decoder``): inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.N.key/value``; outputs ``logits``,
``present.N.key/value``. Its cache grows by concatenation, so the config sets
``past_present_share_buffer`` to false (GenAI then feeds each step's ``present`` back as the
next ``past``). GenAI holds a float cache: a quantized cache is exported in its float form
(``kv_storage="float"``: the same dequantized values, so the same tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.frontend.trace import TracedModel
from lowbit.io import write_tokenizer

def check_exportable(traced: TracedModel) -> None:
    """A decode step with a float cache, or an error that says what to do instead."""
    if traced.decoder is None:
        said = [n for n in traced.notes if "cache" in n]
        raise LowbitError("ONNX Runtime GenAI needs a causal LM traced with its key/value cache; this model "
                          "was not" + (f": {said[0]}" if said else ""))
    stored = [v for v in traced.decoder.cache_inputs(traced.graph) if not v.tensor_type.dtype.is_float
              or v.tensor_type.dtype.bits < 16]
    if stored:
        raise LowbitError(f"the key/value cache is stored quantized ({stored[0].name}: "
                          f"{stored[0].tensor_type.dtype.short}); ONNX Runtime GenAI holds a float cache. Compile "
                          "with kv_storage=\"float\" (the same values held as floats: the same tokens)")


def genai_config(traced: TracedModel, context_length: int | None = None) -> dict:
    """GenAI's configuration for the exported decoder."""
    decoder = traced.decoder
    config = decoder.model_config
    caches = decoder.cache_inputs(traced.graph)
    kv_heads, head_size = caches[0].tensor_type.shape[1], caches[0].tensor_type.shape[-1]
    eos = next((e for e in (decoder.eos_token_id, config.get("eos_token_id")) if e is not None), None)
    if eos is None:  # GenAI needs an end token in the vocabulary; a model without one gets its pad or 0
        eos = decoder.pad_token_id if decoder.pad_token_id is not None else 0
    pad = decoder.pad_token_id if decoder.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    length = context_length or int(config.get("max_position_embeddings") or config.get("n_positions") or 4096)
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id") or 0,
            "context_length": length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": int(head_size),
                "hidden_size": int(config.get("hidden_size") or config.get("n_embd") or head_size),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(config.get("num_attention_heads") or config.get("n_head") or kv_heads),
                "num_hidden_layers": decoder.n_layers,
                "num_key_value_heads": int(kv_heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            # GenAI runs every decoder-only type through one class; what it feeds is set above
            "type": "llama",
            "vocab_size": int(config.get("vocab_size") or 0),
        },
        "search": {"do_sample": False, "max_length": length, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def export_genai(traced: TracedModel, out_dir: str | os.PathLike, *, tokenizer=None,
                 source_dir: str | os.PathLike | None = None, hadamard: str = "matmul",
                 context_length: int | None = None) -> Path:
    """Write the GenAI folder for ``traced`` into ``out_dir`` (files replaced as a whole: a
    failure leaves the folder as it was). The tokenizer is ``tokenizer`` saved, or the tokenizer
    files of ``source_dir`` (the model's transformers folder) copied."""
    from lowbit.backends.onnx.export import build_onnx, save_atomically

    check_exportable(traced)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = build_onnx(traced, hadamard=hadamard)
    work = Path(tempfile.mkdtemp(prefix=".genai.", dir=out))
    try:
        save_atomically(model, work / "model.onnx")
        (work / "genai_config.json").write_text(json.dumps(genai_config(traced, context_length), indent=2))
        write_tokenizer(work, tokenizer, source_dir)
        for f in sorted(work.iterdir(), key=lambda p: p.name == "genai_config.json"):  # the config last
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def genai_generate(folder: str | os.PathLike, prompt, max_new_tokens: int) -> list[int]:
    """Greedy tokens ONNX Runtime GenAI generates after ``prompt`` (a [1, n] tensor of ids)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.numpy().astype("int32"))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[prompt.shape[1]:]]
