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
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from lowbit.errors import TraceError
from lowbit.ir.graph import Graph
from lowbit.ir.store import LazyRows, LazyTensor, lazy_safetensors

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


def hub_rows(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
    """Where transformers saves parameter ``name`` (of ``shape``) when its model stacks what the
    checkpoint holds apart (MoE experts: one [experts, out, in] parameter, one key per expert
    and projection): each checkpoint key with the rows of the parameter, seen as [rows, last
    dim], that it holds, in its order. Read off transformers' own save-time conversion of a
    probe whose rows hold their index. None when the parameter is saved as itself, or split
    otherwise than by whole rows."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion mappings: parameters are saved as themselves
        return None
    if len(shape) < 2:
        return None
    rows = torch.arange(math.prod(shape[:-1])).reshape(*shape[:-1], 1).expand(shape)
    try:
        layout = revert_weight_conversion(model, {name: rows})
    except Exception:  # a conversion that does not take this parameter alone
        return None
    if set(layout) == {name} or any(index.shape[-1] != shape[-1] for index in layout.values()):
        return None
    out = {key: index[..., 0].reshape(-1).clone() for key, index in layout.items()}
    taken = torch.cat(list(out.values()))
    if taken.numel() != rows.shape[:-1].numel() or len(torch.unique(taken)) != taken.numel():
        return None
    return out


def _assembled(model: torch.nn.Module, name: str, shape: tuple[int, ...], available: dict[str, LazyTensor],
               prefix: str) -> LazyRows | None:
    """Parameter ``name`` assembled from the checkpoint keys transformers saves it as
    (``hub_rows``); None when it is saved as itself or the keys are not all there."""
    layout = hub_rows(model, name, shape)
    if layout is None:
        return None
    parts = []
    for key, rows in layout.items():
        found = _checkpoint_key([key], available, prefix)
        if found is None or available[found].numel() != rows.numel() * shape[-1]:
            return None
        parts.append((available[found], rows))
    first = parts[0][0]
    return LazyRows(first.path, first.offset, first.stored, shape, first.dtype, stamp=first.stamp, parts=tuple(parts))


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
                lazy = available[key] if key is not None else _assembled(model, names[id(p)][0], tuple(p.shape),
                                                                         available, prefix)
                if lazy is None:
                    missing.append(names[id(p)][0])
                    continue
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


@contextlib.contextmanager
def eager_on_placeholders(model: torch.nn.Module) -> Iterator[None]:
    """For an eager run of a weightless model (its cache's shapes): transformers' MoE experts
    take their loop fallback, not torch's grouped matmul kernel, which refuses the placeholders'
    zero strides. Nothing changes for a model with real weights."""
    moe = None
    if is_weightless(model):
        try:
            from transformers.integrations import moe
        except ImportError:
            moe = None
    if moe is None or not hasattr(moe, "_can_use_grouped_mm"):
        yield
        return
    check = moe._can_use_grouped_mm
    moe._can_use_grouped_mm = lambda *args, **kwargs: False
    try:
        yield
    finally:
        moe._can_use_grouped_mm = check


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
