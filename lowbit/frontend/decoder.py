"""Causal LMs are traced as one decode step, with the key/value cache as graph inputs and outputs.

A transformers model that can generate is wrapped in :class:`DecoderStep`, whose forward takes
``input_ids``, ``attention_mask`` (over past and new tokens), ``position_ids`` and the cache as
one tensor per layer and kind (``past_key_values.N.key`` / ``.value``, [batch, kv_heads, past,
head_dim]), rebuilds transformers' own ``DynamicCache`` from them, and returns the logits and
every layer's cache after the step (``present.N.key`` / ``.value``). The cache grows: ``past``
is a dynamic dim, from 0 (a prompt) upward, so one graph serves prefill and decode, holds no
state between calls, and has the inputs and outputs ONNX Runtime GenAI feeds (``present`` of
one step is ``past`` of the next). A graph with static cache buffers would instead mutate
state in place, which neither the IR's interpreter nor an ONNX graph expresses.

The compiled module still answers the call the model was traced on (``fast(ids)``, or a
tokenizer's output): :class:`DecoderIO` turns such a call into a step with an empty cache and
the step's outputs back into the model's own output structure, without the cache.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from lowbit.frontend.inputs import Call
from lowbit.ir.graph import Graph

STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")


def input_ids(call: Call) -> torch.Tensor | None:
    """The ids of a call: keyword ``input_ids`` or the first positional argument."""
    args, kwargs = call
    return kwargs.get("input_ids", args[0] if args else None)


def _cache_parameter(model: torch.nn.Module) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((p for p in ("cache", "past_key_values") if p in params), None)


def cache_unsupported(model: torch.nn.Module, example: Call) -> str | None:
    """Why ``model`` on ``example`` cannot be traced with its cache (None: it can)."""
    if not getattr(model, "can_generate", lambda: False)():
        return "it does not generate"
    names = list(inspect.signature(model.forward).parameters)
    if _cache_parameter(model) is None:
        return f"{type(model).__name__}.forward takes no cache"
    args, kwargs = example
    given = set(kwargs) | set(names[:len(args)])
    extra = given - set(STEP_INPUTS)
    if extra:
        return f"the example gives {', '.join(sorted(extra))} (a decode step takes {', '.join(STEP_INPUTS)})"
    ids = input_ids(example)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return "the example has no input_ids matrix"
    return None


class DecoderStep(torch.nn.Module):
    """``model`` as one decode step over tensors (see the module docstring).

    Every layer's cache is a full one (transformers' ``DynamicLayer``), sliding-window layers
    included: their attention masks still apply the window (transformers builds them from the
    config), but the cache is not trimmed to it. So every layer's cache has the same length,
    ``past``, one dynamic dim; trimmed caches (GPT-OSS, Gemma 2/3 past their windows) would
    stop at the window while the others grow, which one graph cannot type."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.cache_arg = _cache_parameter(model)
        # ALiBi models (Bloom, MPT) place tokens by the mask alone: the step still takes the
        # positions, so that every decode step has the same inputs, and leaves them unread
        self.positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list):
        from transformers.cache_utils import DynamicCache

        pairs = [(past_key_values[i], past_key_values[i + 1]) for i in range(0, len(past_key_values), 2)]
        cache = DynamicCache(pairs)  # full layers, the window by the mask (see above)
        where = {"position_ids": position_ids} if self.positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **where, **{self.cache_arg: cache})
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return out.logits, present


def positions_from_mask(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last ``new`` tokens: their count of attended tokens before them (as
    transformers' ``generate`` computes them, so a left-padded prompt starts at 0)."""
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    return pos[:, -new:]


@dataclass
class DecoderIO:
    """How a traced decode step maps to the model's own calls and outputs.

    Graph inputs: ``input_ids``, ``attention_mask``, ``position_ids``, then the cache; graph
    outputs: ``logits``, then the cache after the step. Passes that change how the cache is
    stored (``quantize-kv-cache``) add or change cache inputs and outputs in pairs, so cache
    input ``i`` is always fed from cache output ``i`` of the step before.
    """

    out_spec: pytree.TreeSpec  # the model's own output structure, without the cache
    n_layers: int
    eos_token_id: int | list[int] | None = None  # from the model's generation config
    pad_token_id: int | None = None
    model_config: dict = field(default_factory=dict)  # the model's config (for ONNX Runtime GenAI's)

    def cache_inputs(self, graph: Graph) -> list:
        return graph.inputs[len(STEP_INPUTS):]

    def empty_cache(self, graph: Graph, batch: int, device: torch.device | None = None) -> list[torch.Tensor]:
        """A cache of length 0 for ``batch`` sequences, in the graph's cache types."""
        out = []
        for value in self.cache_inputs(graph):
            shape = [d if isinstance(d, int) else (batch if d == "batch" else 0) for d in value.type.shape]
            out.append(torch.zeros(shape, dtype=value.type.dtype.storage, device=device))
        return out

    def step_leaves(self, call: Call, graph: Graph) -> list:
        """The graph's inputs for a call of the model's own form (a prompt, no cache): positions
        0, 1, ... as the model's forward gives them without a cache."""
        args, kwargs = call
        ids = input_ids(call)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pos = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
        if mask is None:
            mask = torch.ones_like(ids)
        if pos is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return [ids, mask, pos, *self.empty_cache(graph, ids.shape[0], ids.device)]

    def warm_leaves(self, graph: Graph, call: Call) -> list:
        """Inputs of a step that has a cache: the call's tokens as a 5-token prompt of 2
        sequences, run through ``graph``, then 3 more tokens with the cache it returned (an
        export traced on an empty cache would take ``past`` for the constant 0)."""
        from lowbit.ir.interpreter import run_graph

        ids = input_ids(call)
        tokens = ids.reshape(-1).repeat(16 // max(ids.numel(), 1) + 1)[:16].reshape(2, 8)
        prompt = self.step_leaves(((tokens[:, :5],), {}), graph)
        with torch.no_grad():
            cache = run_graph(graph, prompt)[1:]
        mask = torch.ones_like(tokens)
        return [tokens[:, 5:], mask, positions_from_mask(mask, 3), *cache]

    def user_outputs(self, outputs: Sequence) -> object:
        return pytree.tree_unflatten([outputs[0]], self.out_spec)

    def input_names(self, graph: Graph) -> list[str]:
        """``past_key_values.N.key`` (and ``.key_scale``, ... for a quantized cache)."""
        return [*STEP_INPUTS, *(_genai_name(v.name, "past_key_values") for v in self.cache_inputs(graph))]

    def output_names(self, graph: Graph) -> list[str]:
        """``logits``, then ``present.N.key`` ... paired with the cache inputs."""
        return ["logits", *(_genai_name(v.name, "present") for v in self.cache_inputs(graph))]


def _genai_name(name: str, prefix: str) -> str:
    """``past_3_key_scale`` → ``<prefix>.3.key_scale``."""
    match = re.match(r"past_(\d+)_(\w+)$", name)
    return f"{prefix}.{match.group(1)}.{match.group(2)}" if match else f"{prefix}.{name}"


def step_example(model: torch.nn.Module, ids: torch.Tensor) -> tuple[tuple, dict]:
    """A decode-step call on tokens from ``ids``: batch 2, 3 new tokens after 5 cached ones
    (sizes that differ, so torch.export keeps every dim its own symbol), with the cache the
    model itself computes for the first 5; and the dynamic dims of each input."""
    batch, past, new = 2, 5, 3
    flat = ids.reshape(-1)
    tokens = flat.repeat((batch * (past + new)) // max(flat.numel(), 1) + 1)[:batch * (past + new)]
    tokens = tokens.reshape(batch, past + new).to(ids.device)
    cache_arg = _cache_parameter(model)
    with torch.no_grad():
        out = model(input_ids=tokens[:, :past], use_cache=True)
    cache = None
    if cache_arg and hasattr(out, "get"):  # transformers ≥ 5.2x names it "cache" (the old name warns)
        cache = out.get("cache") if "cache" in out else out.get("past_key_values")
    if cache is None or not hasattr(cache, "layers"):
        raise TypeError(f"{type(model).__name__} returned no transformers cache")
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if any(k is None or v is None or k.dim() != 4 for k, v in layers):
        raise TypeError(f"{type(model).__name__}'s cache is not [batch, heads, length, dim] per layer")
    flat_cache = [t for kv in layers for t in kv]
    mask = torch.ones(batch, past + new, dtype=torch.long, device=ids.device)
    pos = torch.arange(past, past + new, device=ids.device).expand(batch, new)
    call = (tokens[:, past:], mask, pos, flat_cache)
    shapes = ({0: "batch", 1: "seq"}, {0: "batch", 1: "total"}, {0: "batch", 1: "seq"},
              [{0: "batch", 2: "past"} for _ in flat_cache])
    return call, shapes
