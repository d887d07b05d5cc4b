"""``lowbit.trace``: torch.export (non-strict) → ATen graph → lowbit IR, then canonicalization.

``lowbit.frontend`` is the only package that imports ``torch.export``.

    traced = lowbit.trace(model, (input_ids,), dynamic_shapes=({0: "batch", 1: "seq"},))
    print(traced.graph)
"""

from __future__ import annotations

import contextlib
import inspect
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.export import Dim, ExportedProgram, export
from torch.utils import _pytree as pytree

from lowbit.errors import TraceError
from lowbit.frontend.convert import convert_program
from lowbit.ir.graph import Graph


@dataclass
class TracedModel:
    """A traced model: its graph, and how its Python inputs/outputs map to graph values."""

    graph: Graph
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    example_inputs: tuple
    notes: list[str] = field(default_factory=list)  # what passes chose to tell the user
    dim_ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # named dim → (min, max)

    def output_names(self) -> list[str]:
        """Names for the flat outputs: the output structure's keys where it has them."""
        keys = self.out_spec.context if isinstance(self.out_spec.context, (list, tuple)) else None
        n = self.out_spec.num_leaves
        if keys and len(keys) == n and all(isinstance(k, str) for k in keys):
            return list(keys)
        return [f"output_{i}" for i in range(n)]

    def flatten_inputs(self, args: tuple, kwargs: dict | None = None) -> list:
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.in_spec:
            raise TypeError(f"inputs do not have the traced structure:\n got {spec}\n want {self.in_spec}")
        return leaves

    def unflatten_outputs(self, outputs: list) -> object:
        return pytree.tree_unflatten(outputs, self.out_spec)


def _as_dim(spec: object, dims: dict[str, Dim]) -> object:
    """A dim given by name (a string) becomes a torch.export Dim of that name."""
    if isinstance(spec, str):
        if spec not in dims:
            dims[spec] = Dim(spec)
        return dims[spec]
    if isinstance(spec, dict):
        return {k: _as_dim(v, dims) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_as_dim(v, dims) for v in spec)
    return spec


def _axis_names(model: torch.nn.Module, args: tuple, kwargs: dict, shapes: object) -> list[dict[int, str]]:
    """For each flattened input, the names of its dynamic axes (for printing symbolic dims)."""
    if isinstance(shapes, dict):
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
        per_arg = [(value, shapes.get(name)) for name, value in bound.items()]
    elif isinstance(shapes, (list, tuple)):
        per_arg = list(zip(args, shapes)) + [(v, None) for v in kwargs.values()]
    else:
        per_arg = [(a, None) for a in (*args, *kwargs.values())]
    out: list[dict[int, str]] = []
    for value, spec in per_arg:
        leaves = pytree.tree_leaves(value)
        if isinstance(value, torch.Tensor) and spec is not None:
            items = spec.items() if isinstance(spec, dict) else enumerate(spec)
            out.append({int(k): getattr(d, "__name__", str(d)) for k, d in items if d is not None})
        else:
            out.extend({} for _ in leaves)
    return out


@contextlib.contextmanager
def _module_stack(model: torch.nn.Module) -> Iterator[list[str]]:
    """Track which submodule's forward is running, to name it when tracing fails."""
    stack: list[str] = []
    handles = []

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
        if stack:
            stack.pop()

    for path, mod in model.named_modules():
        label = f"{path or '<root>'} ({type(mod).__name__})"
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, label=label: stack.append(label) and None))
        handles.append(mod.register_forward_hook(leave, always_call=True))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the model's own code in the traceback, as 'file:line in fn'."""
    torch_dir = os.path.dirname(torch.__file__)
    lowbit_dir = os.path.dirname(os.path.dirname(__file__))
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith((torch_dir, lowbit_dir)) and "<" not in frame.filename:
            found = f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"
    return found


def export_model(model: torch.nn.Module, example_inputs: tuple, kwargs: dict | None,
                 dynamic_shapes: object) -> ExportedProgram:
    shapes = _as_dim(dynamic_shapes, {}) if dynamic_shapes is not None else None
    with _module_stack(model) as stack:
        try:
            ep = export(model, tuple(example_inputs), kwargs=kwargs, dynamic_shapes=shapes,
                        strict=False)
        except Exception as e:
            where = f"inside module {stack[-1]}" if stack else "at the model's top level"
            frame = _user_frame(e)
            reason = str(e).strip().splitlines()
            reason_text = "\n    ".join(reason[:12]) if reason else type(e).__name__
            raise TraceError(
                f"torch.export could not trace {type(model).__name__}: it failed {where}"
                + (f"\n  at {frame}" if frame else "")
                + f"\n  torch says ({type(e).__name__}):\n    {reason_text}") from e
    return ep.run_decompositions({})  # functional ATen, higher-order ops inlined, no CIA decomps


def trace(model: torch.nn.Module, example_inputs: tuple, *, kwargs: dict | None = None,
          dynamic_shapes: object = None, canonicalize: bool = True) -> TracedModel:
    """Trace ``model`` on ``example_inputs`` (a tuple of positional arguments) into the IR.

    ``dynamic_shapes`` follows ``torch.export``; a dim may be given by name (a string such as
    ``"batch"``), and that name is what the IR prints for it. With ``canonicalize`` the
    ``canonicalize`` pipeline runs (dropout removal, addmm→linear, RMSNorm fusion, BatchNorm
    folding, attention fusion, constant folding, dead code removal).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lowbit.trace needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        raise TypeError("example_inputs must be a tuple of positional arguments, "
                        f"got {type(example_inputs).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = export_model(model, example_inputs, kwargs, dynamic_shapes)
    finally:
        model.train(was_training)
    names = _axis_names(model, example_inputs, kwargs or {}, dynamic_shapes)
    graph, ranges = convert_program(ep, names)
    traced = TracedModel(graph, ep.call_spec.in_spec, ep.call_spec.out_spec, tuple(example_inputs),
                         dim_ranges=ranges)
    if canonicalize:
        from lowbit.passes import run_pipeline

        run_pipeline(graph, "canonicalize")
    return traced
