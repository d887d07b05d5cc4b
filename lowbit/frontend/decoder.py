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
STATE_NAME = re.compile(r"past_\d+_(conv|state)\d*$")  # a recurrent layer's state (CacheEntry.name)


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
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "an encoder-decoder model: lowbit generates with decoder-only LMs and compiles an " \
               "encoder-decoder for whole calls"
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


@dataclass(frozen=True)
class CacheEntry:
    """One tensor of a layer's cache: attention's ``key`` and ``value`` ([batch, kv_heads, past,
    head_dim], growing by the step's tokens), or a recurrent layer's fixed-size state (Mamba,
    gated DeltaNet, short convolutions: ``conv``, the last inputs of its causal convolution,
    and ``state``, the recurrence's state), replaced by each step. ``index`` numbers the states
    of a layer that holds several."""

    layer: int
    kind: str  # "key" | "value" | "conv" | "state"
    index: int = 0

    @property
    def name(self) -> str:
        return f"past_{self.layer}_{self.kind}{self.index or ''}"

    @property
    def grows(self) -> bool:
        return self.kind in ("key", "value")


def cache_layout(cache) -> list[CacheEntry]:
    """The tensors of a transformers cache after a prompt, layer by layer."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    layout = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for j in range(layer.number_of_states):
                layout += [CacheEntry(i, kind, j) for kind, states in (("conv", layer.conv_states),
                                                                        ("state", layer.recurrent_states))
                           if states.get(j) is not None]
        if getattr(layer, "keys", None) is not None:
            layout += [CacheEntry(i, "key"), CacheEntry(i, "value")]
    return layout


def _layer_tensor(layer, entry: CacheEntry) -> torch.Tensor:
    if entry.grows:
        return layer.keys if entry.kind == "key" else layer.values
    return (layer.conv_states if entry.kind == "conv" else layer.recurrent_states)[entry.index]


def build_cache(layout: Sequence[CacheEntry], tensors: Sequence[torch.Tensor]):
    """A transformers ``DynamicCache`` holding ``tensors`` as ``layout`` lays them out.

    Attention layers get full ``DynamicLayer``s (see :class:`DecoderStep`). A recurrent
    layer's states are taken as the state before the step, zeros for a prompt: a convolution
    over zeros before the first token and a recurrence started from zero are what the model
    computes without a cache. The states are copies, so the model's in-place updates do not
    write to the graph's inputs."""
    from transformers.cache_utils import (DynamicCache, DynamicLayer, LinearAttentionAndFullAttentionLayer,
                                          LinearAttentionLayer)

    by_layer: dict[int, dict[CacheEntry, torch.Tensor]] = {}
    for entry, t in zip(layout, tensors):
        by_layer.setdefault(entry.layer, {})[entry] = t
    layers = []
    for i in range(max(by_layer, default=-1) + 1):
        held = by_layer.get(i, {})
        states = [e for e in held if not e.grows]
        attention = any(e.grows for e in held)
        if not states:
            layer = DynamicLayer()
        else:
            n = max(e.index for e in states) + 1
            layer = (LinearAttentionAndFullAttentionLayer if attention else LinearAttentionLayer)(number_of_states=n)
            for e in states:
                t = held[e].clone()
                layer.dtype, layer.device = t.dtype, t.device
                if e.kind == "conv":
                    layer.conv_states[e.index], layer.conv_kernel_size[e.index] = t, t.shape[-1]
                    layer.is_conv_states_initialized[e.index] = True
                else:
                    layer.recurrent_states[e.index] = t
                    layer.is_recurrent_states_initialized[e.index] = True
                layer.has_previous_state[e.index] = True
        if attention:
            layer.update(held[CacheEntry(i, "key")], held[CacheEntry(i, "value")])
        layers.append(layer)
    return DynamicCache() if not layers else _cache_of(layers)


def _cache_of(layers: list):
    from transformers.cache_utils import Cache, DynamicCache

    cache = DynamicCache()
    Cache.__init__(cache, layers=layers)
    return cache


def cache_tensors(cache, layout: Sequence[CacheEntry]) -> list[torch.Tensor]:
    """The cache's tensors after a step, in ``layout``'s order."""
    return [_layer_tensor(cache.layers[e.layer], e) for e in layout]


class DecoderStep(torch.nn.Module):
    """``model`` as one decode step over tensors (see the module docstring).

    Every layer's cache is a full one (transformers' ``DynamicLayer``), sliding-window layers
    included: their attention masks still apply the window (transformers builds them from the
    config), but the cache is not trimmed to it. So every layer's cache has the same length,
    ``past``, one dynamic dim; trimmed caches (GPT-OSS, Gemma 2/3 past their windows) would
    stop at the window while the others grow, which one graph cannot type."""

    def __init__(self, model: torch.nn.Module, layout: Sequence[CacheEntry], new_mask: bool = False):
        super().__init__()
        self.model = model
        self.layout = tuple(layout)
        # Mamba's mixers multiply their inputs by the mask as given: they get the new tokens' part
        # (transformers' generate passes them no mask after the prompt, all new tokens being real)
        self.new_mask = new_mask
        self.cache_arg = _cache_parameter(model)
        # ALiBi models (Bloom, MPT) place tokens by the mask alone: the step still takes the
        # positions, so that every decode step has the same inputs, and leaves them unread
        self.positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list):
        cache = build_cache(self.layout, past_key_values)
        where = {"position_ids": position_ids} if self.positions else {}
        if self.new_mask:
            attention_mask = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **where, **{self.cache_arg: cache})
        return out.logits, cache_tensors(cache, self.layout)


def empty_cache(graph: Graph, batch: int, device: torch.device | None = None) -> list[torch.Tensor]:
    """A cache of length 0 for ``batch`` sequences in the types of a decode step's cache
    inputs (recurrent states: zeros)."""
    out = []
    for value in graph.inputs[len(STEP_INPUTS):]:
        shape = [d if isinstance(d, int) else (batch if d == "batch" else 0) for d in value.type.shape]
        out.append(torch.zeros(shape, dtype=value.type.dtype.storage, device=device))
    return out


def run_pieces(leaves: list, run, max_step: int | None) -> list:
    """``run`` on a step's inputs; a prompt longer than ``max_step`` runs in pieces of at most
    ``max_step`` tokens, each fed the cache the one before returned: the last piece's outputs,
    with the logits of all pieces joined along the sequence."""
    n = leaves[0].shape[1]
    if not max_step or n <= max_step:
        return run(leaves)
    ids, mask, pos, cache = leaves[0], leaves[1], leaves[2], list(leaves[len(STEP_INPUTS):])
    past, logits = mask.shape[1] - n, []
    for start in range(0, n, max_step):
        end = min(n, start + max_step)
        out = run([ids[:, start:end], mask[:, :past + end], pos[:, start:end], *cache])
        logits.append(out[0])
        cache = list(out[1:])
    return [torch.cat(logits, 1), *cache]


def first_piece(leaves: list, max_step: int | None) -> list:
    """The inputs of the first piece ``run_pieces`` runs (the whole step if it fits)."""
    n = leaves[0].shape[1]
    if not max_step or n <= max_step:
        return leaves
    past = leaves[1].shape[1] - n
    return [leaves[0][:, :max_step], leaves[1][:, :past + max_step], leaves[2][:, :max_step],
            *leaves[len(STEP_INPUTS):]]


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
    max_step: int | None = None  # the most tokens one step takes (see run_prompt); None: any

    def run_prompt(self, leaves: list, run) -> list:
        """``run`` (the graph) on a step's inputs, in pieces of at most ``max_step`` tokens
        (``run_pieces``)."""
        return run_pieces(leaves, run, self.max_step)

    def pieces(self, leaves: list, run) -> list[list]:
        """A prompt's step inputs as the steps ``run_prompt`` would run, each piece's cache the
        one ``run`` (the float graph) returns for the pieces before it: calibration data for a
        graph that takes at most ``max_step`` tokens."""
        if not self.max_step or leaves[0].shape[1] <= self.max_step:
            return [leaves]
        out: list[list] = []
        run_pieces(leaves, lambda piece: out.append(piece) or run(piece), self.max_step)
        return out

    def cache_inputs(self, graph: Graph) -> list:
        return graph.inputs[len(STEP_INPUTS):]

    def state_inputs(self, graph: Graph) -> list:
        """The cache inputs that are recurrent layers' fixed-size states (see ``CacheEntry``)."""
        return [v for v in self.cache_inputs(graph) if STATE_NAME.match(v.name)]

    def empty_cache(self, graph: Graph, batch: int, device: torch.device | None = None) -> list[torch.Tensor]:
        """A cache of length 0 for ``batch`` sequences, in the graph's cache types."""
        return empty_cache(graph, batch, device)

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
        sequences, run through ``graph``, then 3 more tokens (recurrent layers: several chunks'
        worth) with the cache it returned (an export traced on an empty cache would take
        ``past`` for the constant 0)."""
        from lowbit.ir.interpreter import run_graph

        ids = input_ids(call)
        new = chunk_span(self.model_config) if self.state_inputs(graph) else 3  # see chunk_span
        new = min(new, self.max_step or new)
        n = 2 * (5 + new)
        tokens = ids.reshape(-1).repeat(n // max(ids.numel(), 1) + 1)[:n].reshape(2, 5 + new)
        prompt = self.step_leaves(((tokens[:, :5],), {}), graph)
        with torch.no_grad():
            cache = run_graph(graph, prompt)[1:]
        mask = torch.ones_like(tokens)
        return [tokens[:, 5:], mask, positions_from_mask(mask, new), *cache]

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


def scan_chunk(config: dict) -> int:
    """The chunk a recurrent layer's scan splits a sequence into (``config``: the model's, as a
    dict): a config's ``*chunk_size`` (Mamba-2's 256), else 64 (gated DeltaNet's, fixed in
    transformers' code)."""
    def sizes(d: dict) -> list[int]:
        found = [v for k, v in d.items() if str(k).endswith("chunk_size") and isinstance(v, int) and v > 1]
        return found + [n for v in d.values() if isinstance(v, dict) for n in sizes(v)]

    return max(sizes(config), default=64)


def chunk_span(config: dict) -> int:
    """New tokens for the example step of a model with recurrent layers: more than two chunks
    of its scan, and not a multiple of one. torch.export takes a size that is 1 in the example
    for a constant, so a one-chunk example would give a graph that is wrong past one chunk."""
    return 2 * scan_chunk(config) + 5


def check_lengths(graph: Graph, model: torch.nn.Module, ids: torch.Tensor, length: int,
                  max_step: int | None = None) -> float:
    """Relative error of the traced step's logits on a prompt of ``length`` tokens (from an
    empty cache, in pieces of at most ``max_step``) against the model's own: a trace that holds
    only at the example's length shows here (torch.export may turn a loop over the sequence's
    chunks into a fixed count)."""
    from lowbit.ir.interpreter import run_graph

    flat = ids.reshape(-1)
    tokens = flat.repeat(2 * length // max(flat.numel(), 1) + 1)[:2 * length].reshape(2, length).to(ids.device)
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        try:
            got = run_pieces([tokens, mask, positions_from_mask(mask, length), *empty_cache(graph, 2, ids.device)],
                             lambda leaves: run_graph(graph, leaves), max_step)[0].float()
        except Exception:  # noqa: BLE001 - a shape the trace fixed: the graph fails at another length
            return float("inf")
        want = model(input_ids=tokens, use_cache=False).logits.float()
    if got.shape != want.shape:
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check_continues(model: torch.nn.Module, tokens: torch.Tensor, past: int, layout: list[CacheEntry],
                     example: list[torch.Tensor], new_mask: bool = False) -> None:
    """For a model with recurrent layers: the step run on a prompt from zero states, then on the
    rest with the states it returned, gives the logits of the model run on the whole sequence;
    ``TypeError`` where it does not. Some transformers models (Mamba, Jamba) restart their
    recurrence on every call of more than one token and read the state only when one token
    comes: their step is then tried on one token (``trace._recurrent_step``)."""
    if all(e.grows for e in layout):
        return
    step = DecoderStep(model, layout, new_mask)
    empty = [torch.zeros(*t.shape[:2], 0, *t.shape[3:], dtype=t.dtype, device=t.device) if e.grows
             else torch.zeros_like(t) for e, t in zip(layout, example)]
    mask = torch.ones_like(tokens)
    try:
        with torch.no_grad():
            head, cache = step(tokens[:, :past], mask[:, :past], positions_from_mask(mask[:, :past], past), empty)
            tail, _ = step(tokens[:, past:], mask, positions_from_mask(mask, tokens.shape[1] - past), cache)
            whole = model(input_ids=tokens, use_cache=False).logits
    except RuntimeError as e:
        raise TypeError(f"{type(model).__name__} does not run a step after its cached states: "
                        f"{str(e).strip().splitlines()[0]}") from e
    got = torch.cat([head, tail], 1).float()
    err = ((got - whole.float()).abs().max() / whole.float().abs().max().clamp_min(1e-30)).item()
    if not err <= 1e-3:
        raise TypeError(f"{type(model).__name__}'s recurrent layers do not continue from their cached state on a "
                        f"call of several tokens (logits differ from the whole sequence's by {err:.1e} relative)")


def step_example(model: torch.nn.Module, ids: torch.Tensor, new: int = 3, new_mask: bool = False,
                 check: bool = True) -> tuple[tuple, tuple, list[CacheEntry]]:
    """A decode-step call on tokens from ``ids``: batch 2, ``new`` tokens after 5 cached ones
    (sizes that differ, so torch.export keeps every dim its own symbol), with the cache the
    model itself computes for the first 5; the dynamic dims of each input; and the cache's
    layout. ``check``: the step continues the sequence (``_check_continues``);
    ``new_mask``: the model gets the new tokens' part of the mask (``DecoderStep``)."""
    batch, past = 2, 5
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
    layout = cache_layout(cache)
    flat_cache = cache_tensors(cache, layout)
    if not layout or any(t is None or (e.grows and t.dim() != 4) for e, t in zip(layout, flat_cache)):
        raise TypeError(f"{type(model).__name__}'s cache is not [batch, heads, length, dim] per layer")
    mask = torch.ones(batch, past + new, dtype=torch.long, device=ids.device)
    pos = torch.arange(past, past + new, device=ids.device).expand(batch, new)
    call = (tokens[:, past:], mask, pos, flat_cache)
    seq = {0: "batch", 1: "seq"} if new > 1 else {0: "batch"}  # a one-token step: one token is all it takes
    shapes = (seq, {0: "batch", 1: "total"}, seq, [{0: "batch", 2: "past"} if e.grows else {0: "batch"} for e in layout])
    if check:
        _check_continues(model, tokens, past, layout, flat_cache, new_mask)
    return call, shapes, layout
