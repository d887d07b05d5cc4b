"""Text generation with a compiled causal LM: the decode-step graph run in a loop, its key/value
cache fed back from one step to the next (``lowbit.frontend.decoder``).

    q = lowbit.compile(model, (ids,), recipe="w4a16", calibration=batches)
    out = q.generate(ids, max_new_tokens=32)                 # greedy, as model.generate(ids, ...)
    out = q.generate(ids, max_new_tokens=32, do_sample=True, top_k=50, temperature=0.8)

The loop follows transformers' ``generate``: positions count the attended tokens (a left-padded
prompt starts at 0), sampling applies temperature, then top-k, then top-p, and a sequence that
has produced an end token continues with the pad token until all have ended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lowbit.errors import InputError
from lowbit.frontend.decoder import positions_from_mask


def _ids(eos: int | Sequence[int] | None) -> list[int]:
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
               top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """The next token per row of ``logits`` [batch, vocab]."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        order = logits.sort(-1, descending=False)
        mass = order.values.softmax(-1).cumsum(-1)
        drop = mass <= 1 - top_p
        drop[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order.indices, drop), -math.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt + generated tokens, [batch, prompt + up to max_new_tokens], for a ``CompiledModule``
    traced as a decode step. ``eos_token_id`` / ``pad_token_id`` default to the model's
    generation config."""
    decoder = module.traced.decoder
    if decoder is None:
        notes = [n for n in module.traced.notes if "cache" in n]
        raise InputError("this compiled model was traced without its key/value cache and cannot generate"
                         + (f": {notes[0]}" if notes else ""))
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError(f"input_ids must be a [batch, length] integer tensor, got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    graph = module.graph
    eos = _ids(decoder.eos_token_id if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (decoder.pad_token_id if decoder.pad_token_id is not None
                                                          else (eos[0] if eos else 0))
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    device = next(iter(module.buffers()), input_ids).device
    ids, mask = input_ids.to(device), mask.to(device)
    cache = decoder.empty_cache(graph, ids.shape[0], device)
    step_ids, out = ids, [ids]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        leaves = [step_ids, mask, positions_from_mask(mask, step_ids.shape[1]), *cache]
        module.traced.check(leaves, prompt=True)
        results = decoder.run_prompt(leaves, module._plan().run)
        logits, cache = results[0], list(results[1:])
        token = next_token(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token[:, None])
        if eos:
            done |= torch.isin(token, torch.tensor(eos, device=device))
            if bool(done.all()):
                break
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(step_ids)], 1)
    return torch.cat(out, 1)


def cache_bytes_per_token(graph, decoder) -> int:
    """Bytes the key/value cache holds per token and sequence, over all layers (from the cache
    inputs' types: a dim other than ``batch`` and ``past`` must be static). Recurrent layers'
    states (Mamba, gated DeltaNet, short convolutions) are a fixed size per sequence whatever
    its length, and are not counted."""
    total = 0
    states = {id(v) for v in decoder.state_inputs(graph)}
    for value in decoder.cache_inputs(graph):
        if id(value) in states:
            continue
        shape = [d for d in value.type.shape if d not in ("batch", "past")]
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(f"cache input {value.name} has a dynamic dim other than batch and past: {value.type}")
        total += math.prod(shape) * value.type.dtype.storage.itemsize
    return total
