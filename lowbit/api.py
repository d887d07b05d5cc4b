"""The user-facing entry points: ``lowbit.compile`` and the tracing + pipeline step it shares
with ``lowbit inspect``."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from lowbit.backends.torch import CompiledModule
from lowbit.frontend.trace import TracedModel, trace
from lowbit.passes.base import PassContext
from lowbit.passes.manager import PassManager, PassRecord
from lowbit.passes.pipeline import parse_pipeline


BACKENDS = ("torch", "triton")  # ONNX is an export target: CompiledModule.export_onnx


def full_pipeline(pipeline: str | None, recipe: str | None = None) -> str:
    """Canonicalization always runs first, then the recipe's passes, then the user's pipeline."""
    from lowbit.recipes import recipe_pipeline

    parts = ["canonicalize"]
    if recipe:
        parts.append(recipe_pipeline(recipe))
    if pipeline:
        parts.append(pipeline)
    return ",".join(parts)


def build(model: torch.nn.Module, example_inputs: tuple, *, pipeline: str | None = None,
          recipe: str | None = None, calibration: Iterable[tuple] | None = None,
          kwargs: dict | None = None, dynamic_shapes: object = None, verify: bool = True,
          dump_dir: str | os.PathLike | None = None, measure_drift: bool = True,
          progress: bool = True, observer=None) -> tuple[TracedModel, list[PassRecord]]:
    """Trace ``model`` and run ``canonicalize`` + ``recipe`` + ``pipeline`` on it; returns the
    traced model (its graph transformed) and one record per pass. ``observer(traced, samples)``,
    if given, returns the callback the pass manager calls after each pass (the HTML report)."""
    passes = parse_pipeline(full_pipeline(pipeline, recipe))  # a bad pipeline fails before tracing
    traced = trace(model, example_inputs, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                   canonicalize=False)
    samples = traced.flatten_inputs(example_inputs, kwargs) if measure_drift else None
    batches = None if calibration is None else [traced.flatten_inputs(tuple(b)) for b in calibration]
    ctx = PassContext(example_inputs=samples, calibration=batches, progress=progress)
    manager = PassManager(passes, verify_each=verify, dump_dir=dump_dir, sample_inputs=samples, ctx=ctx,
                          observer=None if observer is None else observer(traced, samples))
    records = manager.run(traced.graph)
    traced.notes = ctx.notes
    return traced, records


def compile(model: torch.nn.Module, example_inputs: tuple, *, recipe: str | None = None,
            calibration: Iterable[tuple] | None = None, pipeline: str | None = None,
            kwargs: dict | None = None, dynamic_shapes: object = None,
            verify: bool = True, dump_dir: str | os.PathLike | None = None,
            progress: bool = True, backend: str = "torch") -> CompiledModule:
    """Trace ``model``, run ``canonicalize`` and then ``pipeline``, and return a module that
    runs the result on ``backend``: "torch" (the reference ops, any device) or "triton"
    (quantized linears, Hadamard rotations and block-sparse attention as Triton kernels on
    CUDA, weights packed once here; the kernels' lowering passes run after ``pipeline``).

        fast = lowbit.compile(model, (ids,), dynamic_shapes=({0: "batch", 1: "seq"},))
        out = fast(ids)            # same structure as model(ids)

        q = lowbit.compile(model, (ids, mask), recipe="w8a8", calibration=batches)

    ``example_inputs`` is a tuple of positional arguments, as for ``torch.export``;
    ``calibration`` is an iterable of such tuples (needed by calibrated passes).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        from lowbit.backends.triton import PIPELINE, TritonModule

        pipeline = ",".join(p for p in (pipeline, PIPELINE) if p)
    traced, records = build(model, example_inputs, pipeline=pipeline, recipe=recipe,
                            calibration=calibration, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                            verify=verify, dump_dir=dump_dir, measure_drift=False, progress=progress)
    if backend == "triton":
        return TritonModule(traced, records)
    return CompiledModule(traced, records)
