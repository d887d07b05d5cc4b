"""The user-facing entry points: ``lowbit.compile`` and the tracing + pipeline step it shares
with ``lowbit inspect``."""

from __future__ import annotations

import os

import torch

from lowbit.backends.torch import CompiledModule
from lowbit.frontend.trace import TracedModel, trace
from lowbit.passes.manager import PassManager, PassRecord
from lowbit.passes.pipeline import parse_pipeline


def full_pipeline(pipeline: str | None) -> str:
    """Canonicalization always runs first; the user's pipeline follows."""
    return "canonicalize" if not pipeline else f"canonicalize,{pipeline}"


def build(model: torch.nn.Module, example_inputs: tuple, *, pipeline: str | None = None,
          kwargs: dict | None = None, dynamic_shapes: object = None, verify: bool = True,
          dump_dir: str | os.PathLike | None = None,
          measure_drift: bool = True) -> tuple[TracedModel, list[PassRecord]]:
    """Trace ``model`` and run ``canonicalize`` + ``pipeline`` on it; returns the traced model
    (its graph transformed) and one record per pass."""
    passes = parse_pipeline(full_pipeline(pipeline))  # a bad pipeline fails before tracing
    traced = trace(model, example_inputs, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                   canonicalize=False)
    samples = traced.flatten_inputs(example_inputs, kwargs) if measure_drift else None
    manager = PassManager(passes, verify_each=verify, dump_dir=dump_dir, sample_inputs=samples)
    return traced, manager.run(traced.graph)


def compile(model: torch.nn.Module, example_inputs: tuple, *, pipeline: str | None = None,
            kwargs: dict | None = None, dynamic_shapes: object = None,
            verify: bool = True, dump_dir: str | os.PathLike | None = None) -> CompiledModule:
    """Trace ``model``, run ``canonicalize`` and then ``pipeline``, and return a module that
    runs the result on the torch backend.

        fast = lowbit.compile(model, (ids,), dynamic_shapes=({0: "batch", 1: "seq"},))
        out = fast(ids)            # same structure as model(ids)

    ``example_inputs`` is a tuple of positional arguments, as for ``torch.export``.
    """
    traced, records = build(model, example_inputs, pipeline=pipeline, kwargs=kwargs,
                            dynamic_shapes=dynamic_shapes, verify=verify, dump_dir=dump_dir,
                            measure_drift=False)
    return CompiledModule(traced, records)
