"""The user-facing entry points: ``lowbit.compile`` and the tracing + pipeline step it shares
with ``lowbit inspect``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping

import torch

from lowbit.backends.torch import CompiledModule
from lowbit.errors import InputError
from lowbit.frontend.inputs import Call, align, as_call, example_call
from lowbit.frontend.trace import TracedModel, trace
from lowbit.ir.parser import clone_graph
from lowbit.passes.base import PassContext
from lowbit.passes.manager import PassManager, PassRecord
from lowbit.passes.pipeline import parse_pipeline
from lowbit.recipes import Recipe


BACKENDS = ("torch", "triton")  # ONNX is an export target: CompiledModule.export_onnx
ROTATIONS = ("fuse-norms", "rotate-residual", "online-hadamard")
ROTATION_MODES = ("auto", "always")
ROTATION_GAIN = 0.01   # rotation is kept when it lowers the calibration output error by more than this
GUARD_BATCHES = 8      # calibration batches the two results are compared on (at most)
GUARD_HOLDOUT = 4      # with this many batches or more, 1/4 of them is held out for the comparison


def full_pipeline(pipeline: str | None, recipe: Recipe | None = None, kv_cache: str | None = None,
                  kv_storage: str = "quantized") -> str:
    """Canonicalization always runs first, then the recipe's passes, then the user's pipeline,
    then the key/value cache's quantization (``kv_cache``: a preset of ``KV_PRESETS``)."""
    from lowbit.passes.kv_cache import kv_pipeline
    from lowbit.recipes import recipe_pipeline

    parts = ["canonicalize"]
    if recipe or isinstance(recipe, Mapping):  # (an empty mapping is refused by name, not taken as none)
        parts.append(recipe_pipeline(recipe))
    if pipeline:
        parts.append(pipeline)
    if kv_cache:
        parts.append(kv_pipeline(kv_cache, kv_storage))
    return ",".join(parts)


def calibration_calls(calibration: Iterable | None, example: Call) -> list[Call] | None:
    """Each calibration batch (a tuple, a tensor, or a dict such as a tokenizer's output) as
    a call in the example's keyword order."""
    if calibration is None:
        return None
    if isinstance(calibration, (Mapping, torch.Tensor)):
        raise InputError("calibration is one batch; give an iterable of batches (e.g. [batch])")
    calls = [align(as_call(b, f"calibration batch {i}"), example, f"calibration batch {i}")
             for i, b in enumerate(calibration)]
    if not calls:
        raise InputError("calibration is empty: give at least one batch")
    return calls


def build(model: torch.nn.Module | TracedModel | str | os.PathLike, example_inputs: object = (), *, pipeline: str | None = None,
          recipe: Recipe | None = None, calibration: Iterable | None = None,
          kwargs: Mapping | None = None, dynamic_shapes: object = None, verify: bool = True,
          dump_dir: str | os.PathLike | None = None, measure_drift: bool = True,
          progress: bool = True, observer=None, kv_cache: str | None = None,
          kv_storage: str = "quantized", cache: bool | None = None,
          rotation: str = "auto", work_dir: str | os.PathLike | None = None) -> tuple[TracedModel, list[PassRecord]]:
    """Trace ``model`` and run ``canonicalize`` + ``recipe`` + ``pipeline`` on it; returns the
    traced model (its graph transformed) and one record per pass. ``observer(traced, samples)``,
    if given, returns the callback the pass manager calls after each pass (the HTML report).

    ``rotation="auto"``: a pipeline that rotates (``fuse-norms``, ``rotate-residual``,
    ``online-hadamard``) and then quantizes is also run without its rotations, both on 3/4 of
    the calibration batches, and the rotation is kept only if its outputs on the other quarter
    are closer to the float model's by more than ``ROTATION_GAIN`` (relative; KL divergence for
    a causal LM); the chosen pipeline then runs on every batch, and a note gives both errors.
    (With fewer than 4 batches nothing is held out: the rotation is kept, unchecked, and a
    note says so.)
    Rotation then does not make a recipe worse on data like the user's, and costs no online
    transforms where it buys nothing. ``"always"`` keeps the rotations unchecked."""
    if rotation not in ROTATION_MODES:
        raise ValueError(f"rotation={rotation!r}: choose one of {', '.join(ROTATION_MODES)}")
    passes = parse_pipeline(full_pipeline(pipeline, recipe, kv_cache, kv_storage))  # a bad pipeline fails before tracing
    if isinstance(model, (str, os.PathLike)):  # a model folder (``trace`` reads it without its weights)
        if isinstance(example_inputs, tuple) and not example_inputs and kwargs is None and calibration is not None:
            calibration = list(calibration)
            example_inputs = calibration[0] if calibration else ()
    if isinstance(model, TracedModel):  # traced once, compiled with several recipes
        traced = dataclasses.replace(model, graph=clone_graph(model.graph), notes=list(model.notes))
        calls = calibration_calls(calibration, (traced.example_inputs, traced.example_kwargs))
    else:
        example = example_call(example_inputs, kwargs)
        calls = calibration_calls(calibration, example)
        traced = trace(model, example[0], kwargs=example[1], dynamic_shapes=dynamic_shapes,
                       canonicalize=False, samples=calls or (), cache=cache)
    samples = traced.example_leaves() if measure_drift else None
    batches = None if calls is None else [traced.flatten_inputs(*c, what=f"calibration batch {i}")
                                          for i, c in enumerate(calls)]
    if traced.decoder is not None and traced.decoder.max_step:  # prompts longer than a step run in pieces
        from lowbit.ir.interpreter import run_graph

        def pieces(leaves: list) -> list[list]:
            return traced.decoder.pieces(leaves, lambda piece: run_graph(traced.graph, piece))

        samples = None if samples is None else pieces(samples)[0]
        batches = None if batches is None else [p for b in batches for p in pieces(b)]
    plain = _without_rotations(passes) if rotation == "auto" and batches else None
    original = clone_graph(traced.graph) if plain is not None else None

    def run(pipeline_passes, graph, dump, report, data=batches, work=None):
        ctx = PassContext(example_inputs=samples, calibration=data, progress=progress,
                          work_dir=None if work is None else str(work))
        manager = PassManager(pipeline_passes, verify_each=verify, dump_dir=dump, sample_inputs=samples,
                              ctx=ctx, observer=None if report is None else report(traced, samples),
                              compared_outputs=1 if traced.decoder is not None else None)
        return manager.run(graph), ctx.notes

    if plain is not None and len(batches) < GUARD_HOLDOUT:
        plain = None
        ctx_note = [f"rotation not checked: {len(batches)} calibration batch(es), the check holds out "
                    f"1/{GUARD_HOLDOUT} of at least {GUARD_HOLDOUT}"]
    else:
        ctx_note = []
    if plain is None:
        records, notes = run(passes, traced.graph, dump_dir, observer, work=work_dir)
        notes = notes + ctx_note
    else:  # both pipelines on most batches, compared on the rest; the better one runs on all of them
        held = len(batches) // GUARD_HOLDOUT
        fit, check = batches[:-held], batches[-held:]
        decoder = traced.decoder is not None
        errors = []
        for candidate in (passes, plain):
            graph = clone_graph(original)
            run(candidate, graph, None, None, fit)
            errors.append(_calibration_error(graph, original, check, decoder))
        keep = errors[0] < (1 - ROTATION_GAIN) * errors[1]
        where = f"{len(check)} held-out calibration batch(es)"
        verdict = (f"rotation {'kept' if keep else 'dropped'}: output error on {where} {errors[0]:.4g} rotated, "
                   f"{errors[1]:.4g} without (kept only when lower by more than {ROTATION_GAIN:.0%}; "
                   "rotation='always' keeps it)")
        records, notes = run(passes if keep else plain, traced.graph, dump_dir, observer, work=work_dir)
        notes = notes + [verdict]
    traced.notes = traced.notes + notes
    return traced, records


def _without_rotations(passes: list) -> list | None:
    """The pipeline without its rotation passes, or None if it does not rotate before a lossy
    pass (``online-hadamard{qk=true}``, the key cache's rotation, stays, on keys only)."""
    rotates = [i for i, p in enumerate(passes) if p.name in ROTATIONS
               and not (p.name == "online-hadamard" and p.where == "none")]
    if not rotates or not any(not p.lossless for p in passes[rotates[0]:]):
        return None
    out = []
    for i, p in enumerate(passes):
        if i not in rotates:
            out.append(p)
        elif p.name == "online-hadamard" and p.qk:
            out.append(dataclasses.replace(p, where="none"))
    return out


def _calibration_error(graph, original, batches, decoder: bool) -> float:
    """How far ``graph``'s outputs are from ``original``'s on the first ``GUARD_BATCHES``
    calibration batches: a causal LM's by the mean KL divergence of its next-token distributions
    (what perplexity feels), anything else by the mean relative L2 error of its outputs."""
    from lowbit.ir.interpreter import Executor
    from lowbit.passes.manager import relative_error

    run, ref = Executor(graph), Executor(original)
    errors = []
    with torch.no_grad():
        for batch in batches[:GUARD_BATCHES]:
            y, y0 = run.run(list(batch)), ref.run(list(batch))
            if decoder:
                logp, logp0 = (torch.log_softmax(t.double(), -1) for t in (y[0], y0[0]))
                errors.append((logp0.exp() * (logp0 - logp)).sum(-1).mean().item())
            else:
                errors.append(relative_error(y, y0))
    return sum(errors) / len(errors)


def compile(model: torch.nn.Module | TracedModel | str | os.PathLike, example_inputs: object = (), *, recipe: Recipe | None = None,
            calibration: Iterable | None = None, pipeline: str | None = None,
            kwargs: Mapping | None = None, dynamic_shapes: object = None,
            verify: bool = True, dump_dir: str | os.PathLike | None = None,
            progress: bool = True, backend: str = "torch", kv_cache: str | None = None,
            kv_storage: str = "quantized", cache: bool | None = None, rotation: str = "auto",
            work_dir: str | os.PathLike | None = None) -> CompiledModule:
    """Trace ``model``, run ``canonicalize``, the ``recipe`` and then ``pipeline``, and return a
    module that runs the result on ``backend``: "torch" (the reference ops, any device) or
    "triton" (quantized linears, Hadamard rotations and block-sparse attention as Triton
    kernels on CUDA, weights packed once here; the kernels' lowering passes run after
    ``pipeline``).

        enc = tokenizer(texts, return_tensors="pt", padding=True)
        fast = lowbit.compile(model, kwargs=enc)   # or (ids,), or (ids, mask)
        out = fast(**enc)                          # same structure as model(**enc), no cache

        q = lowbit.compile(model, kwargs=enc, recipe="w8a8", calibration=[enc1, enc2, ...])

    The example is a tuple of positional arguments, a tensor, or keyword arguments (``kwargs``
    or a mapping as ``example_inputs``); each calibration batch may take any of these forms
    and any batch size and length. For transformers models the batch and sequence dims are
    dynamic without being asked; so is every dim whose size differs in a calibration batch;
    ``dynamic_shapes`` (as for ``torch.export``, a dim named by a string needs no bounds) adds
    more. A cache-returning model (``use_cache=True``) is traced without its cache.

    A causal LM is traced as one decode step with its key/value cache, so the result can
    ``generate``; ``kv_cache`` stores that cache quantized: "int8" or "fp8" (per token and
    head), "k8v4", "int4" (KIVI: keys per channel, values per token), "int4-rot" (keys rotated
    by a Hadamard first, both per token). ``compiled.cache_bytes_per_token()`` says what it holds;
    ``kv_storage="float"`` keeps the same values as floats (for ONNX Runtime GenAI's cache).
    ``cache=False`` traces without the cache (a prompt-only graph; see ``lowbit.trace``).

    A recipe that rotates (``w4a4-rot``...) keeps its rotations only where they lower the
    output error on the calibration batches (``rotation="auto"``, see ``build``; ``"always"``
    skips the check).

    ``model`` may also be a ``TracedModel`` (``lowbit.trace``, or ``compiled.traced``): it is
    copied and not traced again, so one trace serves several recipes; its dims stay as traced.

    ``model`` may be a transformers model folder (a path): it is traced without loading its
    weights, which are read from its safetensors files when used, and calibration runs block
    by block, so a model larger than memory quantizes (docs/scale.md). Without an example, the
    first calibration batch is the example. ``work_dir``: GPTQ saves its state there after each
    block, and a run interrupted later resumes from the last finished block.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        from lowbit.backends.triton import PIPELINE, TritonModule

        pipeline = ",".join(p for p in (pipeline, PIPELINE) if p)
    else:  # the packed CPU GEMMs take quant.linear / quant.dynamic_linear (an exact fusion)
        pipeline = ",".join(p for p in (pipeline, "fuse-quantized-linear") if p)
    traced, records = build(model, example_inputs, pipeline=pipeline, recipe=recipe,
                            calibration=calibration, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                            verify=verify, dump_dir=dump_dir, measure_drift=False, progress=progress,
                            kv_cache=kv_cache, kv_storage=kv_storage, cache=cache, rotation=rotation,
                            work_dir=work_dir)
    if backend == "triton":
        return TritonModule(traced, records)
    return CompiledModule(traced, records)
