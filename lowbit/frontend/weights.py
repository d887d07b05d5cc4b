"""A transformers model folder traced without loading its weights.

``weightless_model(folder)`` builds the model from its ``config.json`` with every parameter a
zero-byte placeholder (a 0-d zero expanded to the parameter's shape) and its buffers real
(rotary tables are computed, not stored). ``trace`` runs torch.export on it as on any model;
``bind_weights`` then swaps each placeholder constant of the graph for a ``LazyTensor`` that
reads the parameter from the folder's safetensors shards when a pass or the interpreter uses it.
A 7B model is traced in seconds and never held in memory as a whole.

    model = weightless_model("path/to/llama")      # nothing read but config and shard headers
    traced = lowbit.trace(model, (ids,))           # constants read on use

The model's own forward computes with zeros: it is for tracing only.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from lowbit.errors import TraceError
from lowbit.ir.graph import Graph
from lowbit.ir.store import LazyTensor, lazy_safetensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ATTR = "_lowbit_weights"  # on a weightless model: placeholder data_ptr → LazyTensor


def shard_tensors(folder: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every tensor of a model folder's safetensors weights (one file, or shards listed by
    ``model.safetensors.index.json``), unread."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise TraceError(f"{folder / INDEX} is not a safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        files = [SINGLE]
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))) or "none"
        raise TraceError(f"{folder} has no safetensors weights ({SINGLE} or {INDEX}; other weight files: {found}); "
                         "lowbit reads weights lazily from safetensors only (it never unpickles)")
    tensors: dict[str, LazyTensor] = {}
    for name in files:
        tensors.update(lazy_safetensors(folder / name))
    return tensors


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters created inside are moved to the meta device as they are registered (no memory,
    no initialization work); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _checkpoint_key(names: list[str], available: dict[str, LazyTensor], prefix: str) -> str | None:
    """The checkpoint's key for a parameter known by ``names`` (several when tied): the name
    itself, or with the base model's prefix added or removed (a base model's checkpoint read
    into a head class, or the reverse)."""
    for name in names:
        for key in (name, f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else None):
            if key and key in available:
                return key
    return None


def weightless_model(folder: str | os.PathLike, model_class=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The folder's model (``model_class``, default the class its config's ``architectures``
    names, else ``AutoModel``) with placeholder parameters bound to the folder's weights,
    computing in ``dtype``. A parameter the checkpoint lacks, or one of another shape, is an
    error naming it."""
    import transformers as tf

    folder = Path(folder)
    config = tf.AutoConfig.from_pretrained(folder)
    if model_class is None:
        model_class = next((getattr(tf, a) for a in getattr(config, "architectures", None) or []
                            if hasattr(tf, a)), tf.AutoModel)
    available = shard_tensors(folder)
    with _parameters_on_meta():
        model = (model_class.from_config(config) if hasattr(model_class, "from_config")
                 and model_class.__name__.startswith("Auto") else model_class(config))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    prefix = getattr(model, "base_model_prefix", "") or "model"
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    bound: dict[int, LazyTensor] = {}
    placeholders: dict[int, torch.nn.Parameter] = {}
    missing = []
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in placeholders:
                key = _checkpoint_key(names[id(p)], available, prefix)
                if key is None:
                    missing.append(names[id(p)][0])
                    continue
                lazy = available[key]
                if tuple(lazy.shape) != tuple(p.shape):
                    raise TraceError(f"{folder}: {key} is {tuple(lazy.shape)} in the checkpoint, "
                                     f"the model's {names[id(p)][0]} is {tuple(p.shape)}")
                holder = torch.nn.Parameter(torch.zeros((), dtype=dtype).expand(p.shape), requires_grad=False)
                placeholders[id(p)] = holder
                bound[holder.data_ptr()] = lazy.with_dtype(dtype)
            module._parameters[pname] = placeholders[id(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TraceError(f"{folder}: the checkpoint has no weights for {shown} "
                         f"({type(model).__name__} from config.json)")
    setattr(model, _ATTR, bound)
    return model


def is_weightless(model: object) -> bool:
    return isinstance(getattr(model, _ATTR, None), dict)


def bind_weights(graph: Graph, model: torch.nn.Module) -> int:
    """Replace the graph's placeholder constants by the weights they stand for (read on use);
    returns how many. A placeholder is known by its storage, which nothing else shares."""
    bound: dict[int, LazyTensor] = getattr(model, _ATTR, {})
    count = 0
    for name in list(graph.tensors):
        if graph.tensors.is_lazy(name):
            continue
        t = graph.tensors.raw(name)
        lazy = bound.get(t.data_ptr())
        if lazy is not None and tuple(lazy.shape) == tuple(t.shape):
            graph.tensors[name] = lazy
            count += 1
    return count
