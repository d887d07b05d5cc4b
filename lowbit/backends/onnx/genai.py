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
(``kv_storage="float"``: the same dequantized values, so the same tokens). A sliding-window
layer's cache is full length too: its mask applies the window (``lowbit.frontend.decoder``), so
the config declares no window for GenAI to trim.

GenAI allocates a layer's key and value cache in one shape. Multi-head latent attention
(DeepSeek-V2/V3) caches two latents of different widths per layer, [b, 1, t, r] (the
compressed key/value) and [b, 1, t, d] (the rotary key): the folder's graph takes and returns
their concatenation as two halves of width (r + d) / 2, joined and sliced back at its inputs
and outputs (``even_cache``): the same values in the same cache size.

ONNX Runtime fuses a blocked ``DequantizeLinear → MatMul`` into ``MatMulNBits``, whose default
accuracy level 4 quantizes the activations to int8; the config sets level 0 (the activations'
own precision), so a recipe with float activations (``w4a16``) runs as compiled and GenAI's
tokens are lowbit's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.frontend.decoder import STEP_INPUTS
from lowbit.frontend.trace import TracedModel
from lowbit.io import write_tokenizer
from lowbit.ir.attrs import CallArgs, Ref
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.parser import clone_graph
from lowbit.ir.types import TensorType
from lowbit.ir.verify import verify

# how ONNX Runtime computes the MatMulNBits it fuses from DequantizeLinear → MatMul: 0 in the
# activations' own precision, as lowbit's backends do (its default, 4, quantizes them to int8)
MATMUL_NBITS_ACCURACY = "0"


def check_exportable(traced: TracedModel) -> None:
    """A decode step with a float cache, or an error that says what to do instead."""
    if traced.decoder is None:
        said = [n for n in traced.notes if "cache" in n]
        raise LowbitError("ONNX Runtime GenAI needs a causal LM traced with its key/value cache; this model "
                          "was not" + (f": {said[0]}" if said else ""))
    states = traced.decoder.state_inputs(traced.graph)
    if states:
        raise LowbitError(f"{traced.decoder.model_config.get('model_type', 'this model')}'s recurrent layers carry "
                          f"fixed-size states ({', '.join(v.name for v in states[:3])}"
                          f"{', ...' if len(states) > 3 else ''}) beside the key/value cache, and ONNX Runtime GenAI's "
                          "decoder feeds back a key/value cache only. export_onnx writes the decode step with the "
                          "states as inputs and outputs (past_key_values.N.conv/.state → present.N...), for ONNX "
                          "Runtime to run")
    stored = [v for v in traced.decoder.cache_inputs(traced.graph) if not v.tensor_type.dtype.is_float
              or v.tensor_type.dtype.bits < 16]
    if stored:
        raise LowbitError(f"the key/value cache is stored quantized ({stored[0].name}: "
                          f"{stored[0].tensor_type.dtype.short}); ONNX Runtime GenAI holds a float cache. Compile "
                          "with kv_storage=\"float\" (the same values held as floats: the same tokens)")
    for key, value in _layers(traced.decoder.cache_inputs(traced.graph)):
        why = _uneven_misfit(key, value)
        if why:
            raise LowbitError(f"layer {key.name.split('_')[1]}'s key/value cache ({key.name}: "
                              f"{list(key.tensor_type.shape)}, {value.name}: {list(value.tensor_type.shape)}) does not "
                              f"fit ONNX Runtime GenAI, which allocates a layer's key and value in one shape: {why}")


def _layers(caches: list[Value]) -> list[tuple[Value, Value]]:
    """(key, value) per layer: the decode step's cache inputs alternate."""
    return list(zip(caches[0::2], caches[1::2]))


def _uneven_misfit(key: Value, value: Value) -> str | None:
    """Why a layer's key and value of different shapes cannot be held as two halves of their
    concatenation along the last dim (None: they can, or are of one shape already)."""
    k, v = key.tensor_type, value.tensor_type
    if k.shape == v.shape:
        return None
    if k.dtype != v.dtype or k.shape[:-1] != v.shape[:-1]:
        return "they differ in more than their last dim"
    if not isinstance(k.shape[-1], int) or not isinstance(v.shape[-1], int):
        return "their last dims are not fixed"
    if (k.shape[-1] + v.shape[-1]) % 2:
        return f"their widths {k.shape[-1]} + {v.shape[-1]} do not split in two equal halves"
    return None


def even_cache(traced: TracedModel) -> TracedModel:
    """``traced`` with every layer's key and value cache of one shape (see the module
    docstring): where they differ, a copy whose graph takes and returns each such layer's cache
    as the two halves of key ⧺ value along the last dim. Values and tokens are unchanged."""
    uneven = [(k.name, v.name) for k, v in _layers(traced.decoder.cache_inputs(traced.graph))
              if k.tensor_type.shape != v.tensor_type.shape]
    if not uneven:
        return traced
    graph = clone_graph(traced.graph, share_tensors=True)  # only nodes are added: constants shared
    by_name = {v.name: v for v in graph.inputs}
    for key, value in uneven:
        _join_halves(graph, by_name[key], by_name[value])
    verify(graph)
    return dataclasses.replace(traced, graph=graph)


def _join_halves(graph: Graph, key: Value, value: Value) -> None:
    """Cache inputs ``key`` [.., a] and ``value`` [.., b] become two inputs [.., (a + b) / 2],
    joined and sliced back into a and b; their outputs are joined and split alike."""
    split = key.tensor_type.shape[-1]
    width = split + value.tensor_type.shape[-1]
    half = TensorType(key.tensor_type.shape[:-1] + (width // 2,), key.tensor_type.dtype)
    halves = [Value(key.name, half), Value(value.name, half)]  # GenAI's names are made from these
    first = next(n for n in graph.nodes if n in key.users or n in value.users)
    joined = _cat(graph, halves, before=first)
    key.replace_all_uses_with(_slice(graph, joined, 0, split, before=first))
    value.replace_all_uses_with(_slice(graph, joined, split, width, before=first))
    i = graph.inputs.index(key)
    graph.inputs = graph.inputs[:i] + halves + graph.inputs[i + 2:]
    o = i - len(STEP_INPUTS) + 1  # cache output o (after the logits) is what input i takes next step
    joined = _cat(graph, graph.outputs[o:o + 2])
    graph.set_outputs([*graph.outputs[:o], _slice(graph, joined, 0, width // 2),
                       _slice(graph, joined, width // 2, width), *graph.outputs[o + 2:]])


def _cat(graph: Graph, parts: list[Value], before: Node | None = None) -> Value:
    t = parts[0].tensor_type
    width = sum(p.tensor_type.shape[-1] for p in parts)
    node = graph.append("aten.cat.default", parts, {"args": CallArgs(((Ref(0), Ref(1)), -1), ())},
                        [TensorType(t.shape[:-1] + (width,), t.dtype)], before=before, name="genai_cache")
    return node.result


def _slice(graph: Graph, x: Value, start: int, end: int, before: Node | None = None) -> Value:
    t = x.tensor_type
    node = graph.append("aten.slice.Tensor", [x], {"args": CallArgs((Ref(0), -1, start, end), ())},
                        [TensorType(t.shape[:-1] + (end - start,), t.dtype)], before=before, name="genai_cache")
    return node.result


def genai_config(traced: TracedModel, context_length: int | None = None) -> dict:
    """GenAI's configuration for the exported decoder (``traced`` as ``even_cache`` leaves it)."""
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
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    "session.qdq_matmulnbits_accuracy_level": MATMUL_NBITS_ACCURACY},
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
    traced = even_cache(traced)
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
