"""Saving a compiled model and loading it back without the model's code or calibration data.

    compiled.save("out/llama-w4a16")            # or: lowbit export MODEL --recipe R --save DIR
    q = lowbit.load("out/llama-w4a16")          # a CompiledModule, bit-exact with ``compiled``
    q = lowbit.load("out/llama-w4a16", backend="triton")   # repacked for the GPU kernels

A saved model is a folder of plain data, nothing pickled:

- ``lowbit.json``: format name and version, the input/output structure (torch's pytree JSON),
  the example call's non-tensor leaves, the dims' ranges, the notes, and for a causal LM the
  decode step's description (layers, end-of-sequence ids, the model's config);
- ``graph.lbir``: the graph as ``print_graph`` writes it (each constant with its content hash);
- ``weights.safetensors``: the graph's constants in their own dtypes (int8/int4 codes as int8,
  fp8 as fp8, packed nothing: the backend packs at load), and the example's tensors.

Loading checks every constant against the text (present, dtype, shape, content hash), so a
truncated, edited or foreign folder is an error naming the file and the constant. The folder
is written next to its destination and renamed into place: a failed save leaves nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from lowbit.errors import CheckpointError, LowbitError
from lowbit.frontend.decoder import DecoderIO
from lowbit.frontend.trace import TracedModel
from lowbit.io import staged_folder
from lowbit.ir.parser import parse_graph
from lowbit.ir.printer import print_graph
from lowbit.ir.store import LazyTensor, WeightFileError, lazy_safetensors, write_safetensors
from lowbit.ir.verify import verify

# A saved model whose weights file is larger than this loads lazily (see load_traced).
LAZY_LOAD_BYTES = 4 << 30
FORMAT = "lowbit-compiled"
VERSION = 1
META, GRAPH, WEIGHTS = "lowbit.json", "graph.lbir", "weights.safetensors"
EXAMPLE_PREFIX = "lowbit.example."  # example tensors' keys in the weights file


# ---- save ---------------------------------------------------------------------------------------

def save(traced: TracedModel, directory: str | os.PathLike) -> Path:
    """Write ``traced`` (graph, constants, input/output structure) to ``directory``: a new
    folder, or one an earlier save wrote (replaced). Returns the folder."""
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / META).is_file()):
        raise CheckpointError(f"{out} exists and is not a saved lowbit model: give a new or empty folder")
    graph = traced.graph
    clash = [name for name in graph.tensors if name.startswith(EXAMPLE_PREFIX)]
    if clash:
        raise CheckpointError(f"constant {clash[0]!r} uses the name prefix {EXAMPLE_PREFIX!r} kept for the example")
    tensors = {name: graph.tensors.raw(name) for name in graph.tensors}  # ones in files read when written
    leaves, example_spec = pytree.tree_flatten((tuple(traced.example_inputs), dict(traced.example_kwargs)))
    example = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[f"{EXAMPLE_PREFIX}{i}"] = leaf.detach().cpu().contiguous()
            example.append({"tensor": f"{EXAMPLE_PREFIX}{i}"})
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            example.append({"value": leaf})
        else:
            raise CheckpointError(f"the example input's leaf {i} is a {type(leaf).__name__}: only tensors and "
                                  "plain numbers/strings can be saved")
    meta = {
        "format": FORMAT, "version": VERSION, "lowbit": _lowbit_version(),
        "in_spec": _spec_dumps(traced.in_spec, "input"),
        "out_spec": _spec_dumps(traced.out_spec, "output"),
        "example_spec": _spec_dumps(example_spec, "example"),
        "example": example,
        "dim_ranges": {k: list(v) for k, v in traced.dim_ranges.items()},
        "ignored_kwargs": list(traced.ignored_kwargs),
        "notes": list(traced.notes),
        "decoder": None if traced.decoder is None else {
            "out_spec": _spec_dumps(traced.decoder.out_spec, "decoder output"),
            "n_layers": traced.decoder.n_layers,
            "eos_token_id": traced.decoder.eos_token_id,
            "pad_token_id": traced.decoder.pad_token_id,
            "model_config": traced.decoder.model_config,
            "max_step": traced.decoder.max_step,
        },
    }
    try:
        meta_text = json.dumps(meta, indent=1, default=_json_default)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the model's description (notes, config) cannot be written as JSON: {e}") from e
    with staged_folder(out, CheckpointError) as tmp:
        (tmp / GRAPH).write_text(print_graph(graph))
        write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": FORMAT})
        (tmp / META).write_text(meta_text)
    return out


def _spec_dumps(spec: pytree.TreeSpec, what: str) -> str:
    try:
        return pytree.treespec_dumps(spec)
    except Exception as e:  # a container type torch's pytree cannot name
        raise CheckpointError(f"the model's {what} structure cannot be saved: {e}") from e


def _json_default(value: object) -> object:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _lowbit_version() -> str:
    from lowbit import __version__

    return __version__


# ---- load ---------------------------------------------------------------------------------------

def load_traced(directory: str | os.PathLike, lazy: bool | None = None) -> TracedModel:
    """The ``TracedModel`` saved in ``directory``, every constant checked against the text.
    ``lazy``: constants stay in the weights file and are read when used (as a model compiled
    from a folder's are); None: when the file is larger than ``LAZY_LOAD_BYTES``."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (a saved lowbit model is a folder with {META})")
    meta_path = folder / META
    if not meta_path.is_file():
        hint = (" (it looks like a transformers model folder: give it to lowbit.compile instead)"
                if (folder / "config.json").is_file() else "")
        raise CheckpointError(f"{folder} has no {META}: not a saved lowbit model{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a lowbit save (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise CheckpointError(f"{meta_path} has format version {meta.get('version')!r}; this lowbit "
                              f"({_lowbit_version()}) reads versions up to {VERSION}: upgrade lowbit")
    for name in (GRAPH, WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} has no {name}: the save is incomplete")
    if lazy is None:
        lazy = (folder / WEIGHTS).stat().st_size > LAZY_LOAD_BYTES
    try:
        tensors = lazy_safetensors(folder / WEIGHTS)
        if not lazy:
            tensors = {k: v.load() for k, v in tensors.items()}
    except WeightFileError as e:
        raise CheckpointError(f"{folder / WEIGHTS} cannot be read (truncated or not safetensors): {e}") from e
    text = (folder / GRAPH).read_text()
    try:
        return _traced_from(meta, text, tensors, folder)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is malformed: {type(e).__name__}: {e}") from e


def _traced_from(meta: dict, text: str, tensors: dict[str, torch.Tensor | LazyTensor], folder: Path) -> TracedModel:
    constants = {k: v for k, v in tensors.items() if not k.startswith(EXAMPLE_PREFIX)}
    try:
        graph = parse_graph(text, constants, require_tensors=True)
    except LowbitError as e:
        raise CheckpointError(f"{folder / GRAPH} does not match {WEIGHTS}: {e}") from e
    for node in graph.nodes:
        if node.op == "core.constant":
            name, want = str(node.attrs["name"]), node.result.tensor_type.dtype.storage
            if graph.tensors.meta(name)[1] != want:
                raise CheckpointError(f"constant {name!r} in {folder / WEIGHTS} is {graph.tensors.meta(name)[1]}, "
                                      f"{GRAPH} says {want}")
    if print_graph(graph) != text:  # the content hashes of the constants, and the text's own form
        bad = next((a for a, b in zip(text.splitlines(), print_graph(graph).splitlines()) if a != b), "")
        raise CheckpointError(f"{folder / WEIGHTS} does not hold the tensors {GRAPH} names (changed or "
                              f"corrupt): first difference at {bad.strip()[:160]!r}")
    verify(graph)
    leaves = []
    for i, leaf in enumerate(meta["example"]):
        if "tensor" in leaf:
            if leaf["tensor"] not in tensors:
                raise CheckpointError(f"{folder / WEIGHTS} lacks the example tensor {leaf['tensor']!r}")
            t = tensors[leaf["tensor"]]
            leaves.append(t.load() if isinstance(t, LazyTensor) else t.clone())  # own memory: torch.export traces it
        else:
            leaves.append(leaf["value"])
    args, kwargs = pytree.tree_unflatten(leaves, _spec_loads(meta["example_spec"]))
    dec = meta.get("decoder")
    decoder = None if dec is None else DecoderIO(_spec_loads(dec["out_spec"]), dec["n_layers"], dec["eos_token_id"],
                                                 dec["pad_token_id"], dec["model_config"], dec.get("max_step"))
    return TracedModel(graph, _spec_loads(meta["in_spec"]), _spec_loads(meta["out_spec"]), tuple(args),
                       notes=list(meta.get("notes", [])),
                       dim_ranges={k: (v[0], v[1]) for k, v in meta["dim_ranges"].items()},
                       example_kwargs=dict(kwargs), ignored_kwargs=tuple(meta.get("ignored_kwargs", ())),
                       decoder=decoder)


def _spec_loads(text: str) -> pytree.TreeSpec:
    """A pytree structure; transformers' output classes register themselves when it is imported."""
    if "transformers." in text:
        import transformers.modeling_outputs  # noqa: F401  (registers the ModelOutput pytree types)
    return pytree.treespec_loads(text)


def load(directory: str | os.PathLike, backend: str = "torch", lazy: bool | None = None):
    """A saved model as a module on ``backend``: "torch" (bit-exact with the one saved) or
    "triton" (its quantized ops repacked for the Triton kernels; no calibration runs).
    ``lazy``: weights read from the folder when used instead of at load (default: when the
    weights file is larger than 4 GiB)."""
    from lowbit.api import BACKENDS
    from lowbit.backends.torch import CompiledModule

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    traced = load_traced(directory, lazy)
    if backend == "triton":
        from lowbit.backends.triton import PIPELINE, TritonModule
        from lowbit.passes.manager import PassManager
        from lowbit.passes.pipeline import parse_pipeline

        PassManager(parse_pipeline(PIPELINE)).run(traced.graph)
        return TritonModule(traced)
    return CompiledModule(traced)
