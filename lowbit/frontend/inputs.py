"""Model inputs as users hold them, and which of their dims stay dynamic in the trace.

A call is ``(args, kwargs)``. Users give the example and each calibration batch as a tuple of
positional arguments, a tensor, or a mapping of keyword arguments (a dict, a tokenizer's
``BatchEncoding``, a ``DataLoader``'s dict batch); :func:`as_call` makes each a call.

:func:`plan_shapes` decides which dims torch.export keeps symbolic, so that nobody writes a
``Dim`` by hand:

- a dim the user names with a string becomes ``Dim.AUTO`` (torch.export infers its range,
  e.g. ``seq <= 512`` from BERT's position table), printed under that name;
- a ``Dim`` the user gives is kept as given;
- for a transformers model without ``dynamic_shapes``, dim 0 of every tensor is ``batch`` and
  dim 1 of every integer matrix (token ids, masks, positions) is ``seq`` (``decoder_seq`` for an
  encoder-decoder's ``decoder_*`` inputs), and dim 1 of a waveform (``input_values``) ``samples``;
- any dim whose size differs between the example and a calibration batch is dynamic too.

torch.export specializes a dim whose example size is 1 to the constant 1, so such a dim is
traced on an example tiled to size 2 (the values only repeat; the graph is the general one).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from lowbit.errors import InputError
from lowbit.ir.graph import Graph
from lowbit.ir.types import TensorType

Call = tuple[tuple, dict]


def as_call(item: object, what: str = "input") -> Call:
    """``item`` (a tuple/list of positional arguments, one tensor, or a mapping of keyword
    arguments such as a tokenizer's output) as ``(args, kwargs)``."""
    if isinstance(item, Mapping):
        return (), {str(k): v for k, v in item.items()}
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise TypeError(f"{what} is a {type(item).__name__}; give a tuple of positional arguments, "
                    "a tensor, or a dict of keyword arguments (e.g. a tokenizer's output)")


def example_call(example_inputs: object, kwargs: Mapping | None) -> Call:
    """The example as a call: ``example_inputs`` may itself be a mapping (then it is the
    keyword arguments) or a tensor; ``kwargs`` adds keyword arguments."""
    args, kw = as_call(() if example_inputs is None else example_inputs, "example_inputs")
    kw.update(as_call(kwargs or {}, "kwargs")[1])
    return args, kw


def unnamed_kwargs(model: torch.nn.Module, kwargs: Mapping) -> list[str]:
    """Keywords the model's forward does not name, which only its ``**kwargs`` would take (a
    tokenizer's ``token_type_ids`` given to a Llama). torch.export cannot give such inputs
    dynamic shapes, and the model ignores them, so they are left out."""
    params = inspect.signature(model.forward).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in kwargs if k not in params]


def drop_kwargs(call: Call, keys: list[str]) -> Call:
    return call[0], {k: v for k, v in call[1].items() if k not in keys}


def align(call: Call, example: Call, what: str) -> Call:
    """``call`` with its keyword arguments in the example's order; a call with other keywords
    or another number of positional arguments is an error naming the difference."""
    args, kwargs = call
    want = list(example[1])
    if set(kwargs) != set(want):
        missing, extra = sorted(set(want) - set(kwargs)), sorted(set(kwargs) - set(want))
        raise InputError(f"{what} has other keyword inputs than the example: "
                         + "; ".join(p for p in (missing and f"missing {', '.join(missing)}",
                                                  extra and f"not in the example {', '.join(extra)}") if p))
    if len(args) != len(example[0]):
        raise InputError(f"{what} has {len(args)} positional inputs, the example {len(example[0])}")
    return tuple(args), {k: kwargs[k] for k in want}


def leaf_names(example: Call) -> list[str]:
    """A readable name per flattened input: the keyword, or ``args[i]``, plus any nesting."""
    leaves, _ = pytree.tree_flatten_with_path(example)
    return [_path_name(path) for path, _ in leaves]


def _path_name(path: tuple) -> str:
    head, *rest = path
    name = "args" if getattr(head, "idx", None) == 0 else ""
    for key in rest:
        text = str(key)
        name = text.strip("[]'\"") if not name and text.startswith("['") else name + text
    return name


@dataclass
class ShapePlan:
    """What :func:`plan_shapes` decided: torch.export's ``dynamic_shapes``, the names of the
    dynamic axes per flattened input, the call to trace on (size-1 dynamic dims tiled to 2)."""

    export_shapes: object
    axis_names: list[dict[int, str]]
    trace_call: Call
    notes: list[str] = field(default_factory=list)


def plan_shapes(model: torch.nn.Module, example: Call, user_shapes: object,
                samples: Iterable[Call] = ()) -> ShapePlan:
    """Which dims of ``example`` stay dynamic (see the module docstring)."""
    leaves, spec = pytree.tree_flatten(example)
    names = leaf_names(example)
    axes = _user_axes(model, example, user_shapes, leaves) if user_shapes is not None else \
        _default_axes(model, leaves, names)
    notes = _varying_axes(leaves, names, spec, samples, axes)
    if not any(axes):
        return ShapePlan(None, [{} for _ in leaves], example, notes)
    by_id = {id(leaf): a for leaf, a in zip(leaves, axes)}
    bound = inspect.signature(model.forward).bind(*example[0], **example[1]).arguments
    export_shapes = {name: pytree.tree_map(lambda x: _export_dims(by_id.get(id(x))), value)
                     for name, value in bound.items()}
    axis_names = [{axis: name for axis, (name, _) in a.items()} for a in axes]
    tiled = [_tile_size_one(leaf, a) for leaf, a in zip(leaves, axes)]
    return ShapePlan(export_shapes, axis_names, pytree.tree_unflatten(tiled, spec), notes)


def _export_dims(axes: dict | None) -> dict | None:
    return None if not axes else {axis: dim for axis, (_, dim) in axes.items()}


def _tile_size_one(leaf: object, axes: dict) -> object:
    for axis, (_, dim) in axes.items():
        if dim is Dim.AUTO and leaf.shape[axis] == 1:
            leaf = torch.cat([leaf, leaf], axis)
    return leaf


def _is_transformers(model: torch.nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def _default_axes(model: torch.nn.Module, leaves: list, names: list[str]) -> list[dict]:
    """An encoder-decoder's ``decoder_*`` inputs have a length of their own, ``decoder_seq``; a
    waveform's samples are a length too."""
    axes: list[dict] = [{} for _ in leaves]
    if not _is_transformers(model):
        return axes
    for leaf, a, name in zip(leaves, axes, names):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            a[0] = ("batch", Dim.AUTO)
            if leaf.dim() == 2 and not leaf.is_floating_point():
                a[1] = ("decoder_seq" if name.startswith("decoder_") else "seq", Dim.AUTO)
            elif leaf.dim() == 2 and name == "input_values":  # a waveform (wav2vec2, HuBERT, WavLM)
                a[1] = ("samples", Dim.AUTO)
    return axes


def _user_axes(model: torch.nn.Module, example: Call, shapes: object, leaves: list) -> list[dict]:
    """Per flattened input, ``{axis: (name, Dim)}`` from the user's ``dynamic_shapes`` (a tuple
    per positional argument, or a dict keyed by parameter name)."""
    if isinstance(shapes, Mapping):
        bound = inspect.signature(model.forward).bind(*example[0], **example[1]).arguments
        pairs = [(value, shapes.get(name)) for name, value in bound.items()]
    elif isinstance(shapes, (list, tuple)):
        pairs = list(zip(example[0], shapes)) + [(v, None) for v in example[1].values()]
    else:
        raise TypeError(f"dynamic_shapes must be a tuple or a dict, got {type(shapes).__name__}")
    by_id: dict[int, dict] = {}
    while pairs:
        value, given = pairs.pop()
        if isinstance(value, (list, tuple)) and isinstance(given, (list, tuple)) and len(value) == len(given):
            pairs.extend(zip(value, given))  # a list of tensors: one spec per tensor
        elif isinstance(value, torch.Tensor) and given is not None:
            items = given.items() if isinstance(given, Mapping) else enumerate(given)
            by_id[id(value)] = {int(k): _named(d) for k, d in items if d is not None}
    return [dict(by_id.get(id(leaf), {})) for leaf in leaves]


def _named(d: object) -> tuple[str, object]:
    """A string dim is torch.export's ``Dim.AUTO`` under that name; a ``Dim`` keeps its own."""
    if isinstance(d, str):
        return d, Dim.AUTO
    return getattr(d, "__name__", str(d)), d


def _varying_axes(leaves: list, names: list[str], spec: pytree.TreeSpec, samples: Iterable[Call],
                  axes: list[dict]) -> list[str]:
    """Make dynamic every dim whose size differs between the example and a sample; a sample of
    another structure or rank is an error naming the input."""
    notes = []
    for k, call in enumerate(samples):
        got, got_spec = pytree.tree_flatten(call)
        if got_spec != spec:
            raise InputError(f"calibration batch {k} does not have the example's structure:\n"
                             f"  got  {got_spec}\n  want {spec}")
        for leaf, other, name, a in zip(leaves, got, names, axes):
            if not isinstance(leaf, torch.Tensor):
                continue
            if not isinstance(other, torch.Tensor) or other.dim() != leaf.dim():
                raise InputError(f"calibration batch {k}: input {name} has shape "
                                 f"{tuple(getattr(other, 'shape', ()))}, the example {tuple(leaf.shape)}")
            for axis, (x, y) in enumerate(zip(leaf.shape, other.shape)):
                if x != y and axis not in a:
                    a[axis] = (f"{name}_{axis}" if axis > 1 else ("batch", "seq")[axis], Dim.AUTO)
                    notes.append(f"input {name} dim {axis} differs between the example ({x}) and "
                                 f"calibration batch {k} ({y}): traced as dynamic")
    return notes


def check_shapes(graph: Graph, leaves: list, names: list[str],
                 ranges: dict[str, tuple[int, int | None]], what: str = "input", fixed_why: str | None = None) -> None:
    """Each tensor in ``leaves`` fits its graph input: its rank, its static dims, and each
    symbolic dim within its range and equal wherever the same symbol stands. torch.export
    gives a lower bound of 2 where it only avoided specializing 0/1; a size of 1 is served.
    ``fixed_why``: why the trace fixed dims the user asked to be dynamic (the trace's note)."""
    if len(leaves) != len(graph.inputs):
        return
    if len(names) != len(leaves):
        names = [v.name for v in graph.inputs]
    seen: dict[str, tuple[int, str]] = {}
    for value, leaf, name in zip(graph.inputs, leaves, names):
        if not isinstance(value.type, TensorType):
            continue
        shape = value.type.shape
        if not isinstance(leaf, torch.Tensor) or leaf.dim() != len(shape):
            got = f"shape {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise InputError(f"{what} {name}: expected a tensor of shape {_show(shape)}, got {got}")
        for axis, (d, n) in enumerate(zip(shape, leaf.shape)):
            _check_dim(d, int(n), f"{what} {name} dim {axis}", ranges, seen, fixed_why)


def _check_dim(d: int | str, n: int, where: str, ranges: dict, seen: dict, fixed_why: str | None = None) -> None:
    if isinstance(d, int):
        if d != n:
            raise InputError(f"{where} is {n}, but the model was traced with this dim fixed at {d}"
                             + (f" ({fixed_why})" if fixed_why else "; trace it with an example or a calibration "
                                "batch of another size there to make it dynamic"))
        return
    if not d.isidentifier():
        return  # an expression of other dims (e.g. s0*2): checked through those
    lo, hi = ranges.get(d, (0, None))
    lo = min(lo, 1) if lo <= 2 else lo
    if n < lo or (hi is not None and n > hi):
        raise InputError(f"{where} ({d}) is {n}; the compiled model serves {d} from {lo} to "
                         f"{hi if hi is not None else 'any size'}")
    if d in seen and seen[d][0] != n:
        raise InputError(f"{where} ({d}) is {n}, but {seen[d][1]} is {seen[d][0]}: they must be equal")
    seen.setdefault(d, (n, where))


def _show(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
