"""``lowbit.trace``: torch.export (non-strict) → ATen graph → lowbit IR, then canonicalization.

``lowbit.frontend`` is the only package that imports ``torch.export``.

    traced = lowbit.trace(model, (input_ids,))      # batch and seq dynamic for transformers models
    print(traced.graph)
"""

from __future__ import annotations

import contextlib
import functools
import os
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram, export
from torch.utils import _pytree as pytree

from lowbit.errors import TraceError
from lowbit.frontend.caches import drop_caches, without_cache
from lowbit.frontend.complex import lower_complex
from lowbit.frontend.convert import convert_program
from lowbit.frontend.decoder import (DecoderIO, DecoderStep, cache_unsupported, check_lengths, chunk_span, first_piece,
                                    input_ids, scan_chunk, step_example)
from lowbit.frontend.inputs import (Call, align, check_shapes, drop_kwargs, example_call, leaf_names,
                                    plan_shapes, unnamed_kwargs)
from lowbit.frontend.noise import quiet
from lowbit.frontend.weights import bind_weights, eager_on_placeholders, is_weightless, weightless_model
from lowbit.ir.graph import Graph
from lowbit.ir.types import TensorType
from lowbit.ir.store import TensorStore


@dataclass
class TracedModel:
    """A traced model: its graph, and how its Python inputs/outputs map to graph values."""

    graph: Graph
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    example_inputs: tuple
    notes: list[str] = field(default_factory=list)  # what passes chose to tell the user
    dim_ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # named dim → (min, max)
    example_kwargs: dict = field(default_factory=dict)
    ignored_kwargs: tuple[str, ...] = ()  # keywords the forward only takes as **kwargs: dropped
    decoder: DecoderIO | None = None  # a causal LM traced as a decode step, its cache as inputs/outputs

    def input_names(self) -> list[str]:
        """Names for the graph inputs in an export (a decode step: ONNX Runtime GenAI's)."""
        if self.decoder is not None:
            return self.decoder.input_names(self.graph)
        return [v.name for v in self.graph.inputs]

    def output_names(self) -> list[str]:
        """Names for the flat outputs: the output structure's keys where it has them."""
        if self.decoder is not None:
            return self.decoder.output_names(self.graph)
        keys = self.out_spec.context if isinstance(self.out_spec.context, (list, tuple)) else None
        n = self.out_spec.num_leaves
        if keys and len(keys) == n and all(isinstance(k, str) for k in keys):
            return list(keys)
        return [f"output_{i}" for i in range(n)]

    def flatten_inputs(self, args: tuple, kwargs: dict | None = None, what: str = "input") -> list:
        """The graph's inputs for a call; a call of another structure, or a tensor whose shape
        the graph cannot serve, is an error naming the input, the dim and the allowed sizes."""
        kwargs = {k: v for k, v in (kwargs or {}).items() if k not in self.ignored_kwargs}
        call = align((tuple(args), kwargs), self._example, what)
        leaves, spec = pytree.tree_flatten(call)
        if spec != self.in_spec:
            raise TypeError(f"{what} does not have the traced structure:\n got {spec}\n want {self.in_spec}")
        if self.decoder is not None:
            leaves = self.decoder.step_leaves(call, self.graph)
        self.check(leaves, what, prompt=True)
        return leaves

    def check(self, leaves: list, what: str = "input", prompt: bool = False) -> None:
        """``leaves`` fit the graph's inputs (see ``check_shapes``); a ``prompt`` may be longer
        than one step takes (``DecoderIO.run_prompt`` runs it in pieces)."""
        why = next((n for n in self.notes if f" {FIXED_BY_TRACE} the example" in n), None)
        if prompt and self.decoder is not None:  # the pieces after the first have its shapes
            leaves = first_piece(leaves, self.decoder.max_step)
        check_shapes(self.graph, leaves, self._input_labels, self.dim_ranges, what, fixed_why=why)

    @functools.cached_property
    def _example(self) -> Call:
        return tuple(self.example_inputs), dict(self.example_kwargs)

    @property
    def _input_labels(self) -> list[str]:
        if self.decoder is not None:
            return self.decoder.input_names(self.graph)
        return self._example_labels

    @functools.cached_property
    def _example_labels(self) -> list[str]:  # computed once: flatten_inputs runs on every call
        return leaf_names(self._example)

    def example_leaves(self) -> list:
        return self.flatten_inputs(self.example_inputs, self.example_kwargs)

    def export_leaves(self) -> list:
        """Inputs to trace an export on: the example, or for a decode step a step with a cache."""
        if self.decoder is not None:
            return self.decoder.warm_leaves(self.graph, self._example)
        leaves = self.example_leaves()
        for i, v in enumerate(self.graph.inputs):  # traced on size-1 dims tiled to 2: export so too
            for axis, d in enumerate(getattr(v.type, "shape", ())):
                low = self.dim_ranges.get(d, (0, None))[0] if isinstance(d, str) else 0
                if isinstance(leaves[i], torch.Tensor) and 0 < leaves[i].shape[axis] < low:
                    reps = -(-low // leaves[i].shape[axis])
                    leaves[i] = torch.cat([leaves[i]] * reps, axis).narrow(axis, 0, low)
        return leaves

    def unflatten_outputs(self, outputs: list) -> object:
        if self.decoder is not None:
            return self.decoder.user_outputs(outputs)
        return pytree.tree_unflatten(outputs, self.out_spec)


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


@contextlib.contextmanager
def _stateless_rope(model: torch.nn.Module) -> Iterator[None]:
    """Within: transformers' rotary embeddings with dynamic NTK scaling (``rope_type`` dynamic)
    compute their frequencies from each call's positions. Theirs keep the longest length seen
    and branch in Python on it, which torch.export cannot trace; for a call that does not
    follow a longer one (a prompt, or decoding as it grows) both give the same frequencies:
    transformers' own function of the length, which keeps the trained ones up to the model's
    maximum position."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    patched = []
    for mod in model.modules():
        kind, plain = getattr(mod, "rope_type", None), getattr(type(mod).forward, "__wrapped__", None)
        if not (isinstance(kind, str) and "dynamic" in kind and plain is not None and hasattr(mod, "inv_freq")):
            continue

        def forward(x, position_ids, mod=mod, plain=plain, init=ROPE_INIT_FUNCTIONS[kind]):
            mod.inv_freq.copy_(init(mod.config, x.device, seq_len=position_ids.max() + 1)[0])
            return plain(mod, x, position_ids)

        mod.forward = forward
        patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the model's own code in the traceback, as 'file:line in fn'."""
    torch_dir = os.path.dirname(torch.__file__)
    lowbit_dir = os.path.dirname(os.path.dirname(__file__))
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith((torch_dir, lowbit_dir)) and "<" not in frame.filename:
            found = f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"
    return found


def export_model(model: torch.nn.Module, call: Call, dynamic_shapes: object) -> ExportedProgram:
    args, kwargs = call
    with _module_stack(model) as stack, quiet(), _stateless_rope(model):
        try:
            ep = export(model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            ep = ep.run_decompositions({})  # functional ATen, higher-order ops inlined, no CIA decomps
        except Exception as e:
            where = f"inside module {stack[-1]}" if stack else "at the model's top level"
            frame = _user_frame(e)
            reason = str(e).strip().splitlines()
            reason_text = "\n    ".join(reason[:12]) if reason else type(e).__name__
            raise TraceError(
                f"torch.export could not trace {type(model).__name__}: it failed {where}"
                + (f"\n  at {frame}" if frame else "")
                + f"\n  torch says ({type(e).__name__}):\n    {reason_text}") from e
    lower_complex(ep)
    return ep


FIXED_BY_TRACE = "fixed at"  # what a note says of a dim the trace could not keep dynamic


class FixedLength(TypeError):
    """A decode step whose graph holds at the example's sequence length only."""


def trace(model: torch.nn.Module, example_inputs: object = (), *, kwargs: dict | None = None,
          dynamic_shapes: object = None, canonicalize: bool = True, samples: Iterable[Call] = (),
          cache: bool | None = None) -> TracedModel:
    """Trace ``model`` (a module, or a transformers folder traced without loading its weights:
    ``lowbit.frontend.weights``) on an example call into the IR.

    ``example_inputs`` is a tuple of positional arguments, a tensor, or a mapping of keyword
    arguments (a tokenizer's output); ``kwargs`` adds keyword arguments. Which dims stay
    dynamic is decided by ``lowbit.frontend.inputs.plan_shapes``: for transformers models the
    batch and sequence dims by default, dims named in ``dynamic_shapes`` (a string name needs no
    bounds: torch.export infers them), and every dim whose size differs in one of ``samples``
    (the calibration calls).

    ``cache``: trace a causal LM as one decode step with its key/value cache as inputs and
    outputs (``lowbit.frontend.decoder``), so the compiled model can ``generate``; None (the
    default) does so for every model that generates and falls back, with a note, to a trace
    without the cache where that fails; False never does (see ``without_cache``). With
    ``canonicalize`` the ``canonicalize`` pipeline runs (dropout removal, addmm→linear, RMSNorm
    fusion, BatchNorm folding, attention fusion, constant folding, dead code removal).
    """
    if isinstance(model, (str, os.PathLike)):  # a model folder: traced without loading its weights
        model = weightless_model(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lowbit.trace needs a torch.nn.Module or a model folder, got {type(model).__name__}")
    example = example_call(example_inputs, kwargs)
    ignored = unnamed_kwargs(model, example[1])
    example, samples = drop_kwargs(example, ignored), [drop_kwargs(c, ignored) for c in samples]
    fallback = []
    if cache is not False:
        why = cache_unsupported(model, example)
        if why is None:
            try:
                return _finish(trace_step(model, example), model, ignored, canonicalize)
            except FixedLength as e:
                why = str(e).splitlines()[0]
                if dynamic_shapes is None and not cache:  # the same loop fixes the prompt's length too
                    dynamic_shapes = batch_only(model, example)
                    why += f"; its sequence length is {FIXED_BY_TRACE} the example's ({input_ids(example).shape[1]})"
            except (TraceError, TypeError) as e:
                why = str(e).splitlines()[0]
        if cache:
            raise TraceError(f"{type(model).__name__} cannot be traced with its key/value cache: {why}")
        if why != "it does not generate":
            fallback.append(f"{type(model).__name__} is traced without its key/value cache ({why}): "
                            "it runs prompts but cannot generate")
    plan = plan_shapes(model, example, dynamic_shapes, samples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), without_cache(model) as cache_notes:
            ep = export_model(model, plan.trace_call, plan.export_shapes)
    finally:
        model.train(was_training)
    graph, ranges = convert_program(ep, plan.axis_names)
    names = leaf_names(plan.trace_call)
    fixed = [f"{name} dim {axis}" for value, name, axes in zip(graph.inputs, names, plan.axis_names)
             for axis in axes if isinstance(value.type, TensorType) and isinstance(value.type.shape[axis], int)] \
        if len(names) == len(graph.inputs) == len(plan.axis_names) else []
    if fixed:
        fallback.append(f"{type(model).__name__}'s {', '.join(fixed)} {FIXED_BY_TRACE} the example's size by "
                        "torch.export: the model's code depends on it (a Python loop over the sequence, or a "
                        "branch on its length)")
    traced = TracedModel(graph, ep.call_spec.in_spec, drop_caches(ep.call_spec.out_spec), example[0],
                         notes=(fallback or cache_notes) + plan.notes, dim_ranges=ranges,
                         example_kwargs=example[1])
    return _finish(traced, model, ignored, canonicalize)


def batch_only(model: torch.nn.Module, example: Call) -> dict:
    """``dynamic_shapes`` for ``example`` (by parameter name) with only the batch dim of each
    tensor dynamic."""
    import inspect

    bound = inspect.signature(model.forward).bind(*example[0], **example[1]).arguments
    return {name: {0: "batch"} if isinstance(v, torch.Tensor) and v.dim() else None for name, v in bound.items()}


def _finish(traced: TracedModel, model: torch.nn.Module, ignored: list[str], canonicalize: bool) -> TracedModel:
    traced.ignored_kwargs = tuple(ignored)
    if is_weightless(model):  # weights stay in the model's files; what passes write goes to disk too
        n = bind_weights(traced.graph, model)
        traced.graph.tensors.offload_to()
        traced.notes.append(f"{n} weights are read from the model's safetensors files when used; "
                            "large tensors the passes write are kept in temporary files")
    if ignored:
        traced.notes.insert(0, f"{', '.join(ignored)}: not a parameter of {type(model).__name__}.forward (only "
                               "**kwargs would take it): left out of the trace, and ignored when given")
    if canonicalize:
        from lowbit.passes import run_pipeline

        run_pipeline(traced.graph, "canonicalize")
    return traced


def trace_step(model: torch.nn.Module, example: Call) -> TracedModel:
    """Trace ``model`` as one decode step (``lowbit.frontend.decoder``); the traced model
    answers ``example``'s kind of call with an empty cache.

    A model with recurrent layers is traced as ``_recurrent_step`` finds it holds: at any
    length, or taking at most one chunk of its scan or one token per run
    (``DecoderIO.max_step``), longer prompts then running in pieces, each continuing from the
    cache of the one before."""
    args, kwargs = example
    ids = input_ids(example)
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    was_training = model.training
    model.eval()
    max_step = None
    try:
        with torch.no_grad(), eager_on_placeholders(model):
            call, shapes, layout = step_example(model, ids, check=False)
            with without_cache(model):  # the model's own output structure, minus the cache
                out_spec = drop_caches(pytree.tree_structure(model(*args, **kwargs)))
            if all(e.grows for e in layout):
                graph, ranges = _export_step(model, call, shapes, layout)
            else:
                graph, ranges, layout, max_step = _recurrent_step(model, ids, config)
    finally:
        model.train(was_training)
    _drop_wrapper_prefix(graph, "model")
    n_layers = 1 + max(e.layer for e in layout)
    for value, entry in zip(graph.inputs[3:], layout):
        value.name = graph.fresh_name(entry.name)
    for dim, lowest in (("past", 0), ("total", 1), ("seq", 1), ("batch", 1)):
        ranges[dim] = (lowest, ranges.get(dim, (0, None))[1])  # torch's lower bounds avoid 0/1 only
    if max_step:
        ranges["seq"] = (1, max_step)
    in_spec = pytree.tree_structure((tuple(args), dict(kwargs)))
    states = sum(not e.grows for e in layout)
    notes = [f"{type(model).__name__} is traced as one decode step: its key/value cache of {n_layers} layers "
             + (f"(and the {states} fixed-size states of its recurrent layers) " if states else "")
             + "is an input and an output of the graph (generate() feeds it back)"]
    if max_step == 1:
        notes.append(f"{type(model).__name__}'s recurrent layers loop over single tokens in Python and read their "
                     "state only on a call of one token: its step takes one token, and a prompt runs token by "
                     "token, each step continuing from the cache of the one before (slower for long prompts; an "
                     "exported ONNX graph likewise takes one token a run)")
    elif max_step:
        why = ("read from its files, a trace of several chunks cannot be checked against the model"
               if is_weightless(model) else "in Python; torch.export fixes the loop's count")
        notes.append(f"{type(model).__name__}'s recurrent layers scan a sequence in chunks of {max_step} tokens ({why}): "
                     "its step takes at most one chunk, and longer prompts run "
                     f"in steps of {max_step} tokens, each continuing from the cache of the one before (an "
                     f"exported ONNX graph likewise takes at most {max_step} tokens a run)")
    generation = getattr(model, "generation_config", None)
    decoder = DecoderIO(out_spec, n_layers, getattr(generation, "eos_token_id", None),
                        getattr(generation, "pad_token_id", None), config, max_step=max_step)
    return TracedModel(graph, in_spec, out_spec, tuple(args), notes=notes, dim_ranges=ranges,
                       example_kwargs=dict(kwargs), decoder=decoder)


def _export_step(model: torch.nn.Module, call: tuple, shapes: tuple, layout: list,
                 new_mask: bool = False) -> tuple[Graph, dict]:
    step = DecoderStep(model, layout, new_mask)
    plan = plan_shapes(step, (call, {}), shapes)
    return convert_program(export_model(step, plan.trace_call, plan.export_shapes), plan.axis_names)


def _recurrent_step(model: torch.nn.Module, ids: torch.Tensor, config: dict) -> tuple:
    """The decode step of a model with recurrent layers, and the most tokens it takes:
    ``(graph, ranges, layout, max_step)``. Tried in turn, each checked against the model at a
    length past what it was traced on:

    1. a step spanning several chunks of the scan (``chunk_span``): any length;
    2. a step of a few tokens, at most one chunk a run (the model loops over its chunks in
       Python, so no trace holds at every length);
    3. a step of one token, prompts run token by token (the model loops over single tokens, and
       reads its state only on a one-token call: Mamba, Jamba); with the new tokens' part of the
       mask where the whole one does not fit the model's mixers.

    A model read from its files has no weights in memory to check against: 2., or 3. where the
    trace fixed the step's length."""
    chunk, weightless = scan_chunk(config), is_weightless(model)
    failures = []

    def attempt(new: int, max_step: int | None, lengths: tuple[int, ...], new_mask: bool = False):
        what = f"{new} token(s) a step" + (" (new tokens masked)" if new_mask else "")
        try:
            call, shapes, layout = step_example(model, ids, new, new_mask, check=not weightless)
            graph, ranges = _export_step(model, call, shapes, layout, new_mask)
        except (TraceError, TypeError) as e:
            failures.append(f"{what}: {str(e).strip().splitlines()[0]}")
            return None
        if new > 1 and isinstance(graph.inputs[0].tensor_type.shape[1], int):
            failures.append(f"{what}: the trace fixed the step's length")  # a loop over single tokens
            return None
        err = 0.0 if weightless else max(check_lengths(graph, model, ids, n, max_step) for n in lengths)
        if not err <= 1e-3:
            failures.append(f"{what}, {_differ(err)}")
            return None
        return graph, ranges, layout, max_step

    span = chunk_span(config)
    found = (None if weightless else attempt(span, None, (2 * span + 7,))) \
        or attempt(3, chunk, (chunk // 2 + 1, chunk + 3)) or attempt(1, 1, (9,)) or attempt(1, 1, (9,), True)
    if found is None:
        raise FixedLength("its recurrent layers trace for the example's length only (torch.export fixed the count "
                          "of a loop over the sequence): " + "; ".join(failures))
    return found


def _differ(err: float) -> str:
    return "the trace fails" if err == float("inf") else f"the logits differ from the model's by {err:.1e} relative"


def _drop_wrapper_prefix(graph: Graph, attr: str) -> None:
    """Module paths and constant names as in the model itself (``model.layers.0.mlp``, not
    ``<attr>.model.layers.0.mlp``): the wrapper that traced it is not the user's."""
    def strip(path: str) -> str:
        return path[len(attr) + 1:] if path.startswith(attr + ".") else ("" if path == attr else path)

    renamed = {}
    for node in graph.nodes:
        node.loc.module = strip(node.loc.module)
        if node.op == "core.constant":
            old = str(node.attrs["name"])
            renamed[old] = strip(old)
            node.attrs["name"] = renamed[old]
    graph.tensors = TensorStore({renamed.get(k, k): graph.tensors.raw(k) for k in graph.tensors})
