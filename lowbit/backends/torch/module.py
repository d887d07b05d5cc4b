"""``CompiledModule``: a ``torch.nn.Module`` that runs a lowbit graph.

The graph's constants are registered as buffers, so ``.to(device)`` / ``.half()`` and
``state_dict()`` behave as for any module. Constants kept in files (a model compiled from a
model folder, or loaded lazily) stay there and are read when a run uses them. Inputs and
outputs keep the traced model's Python structure (a transformers ``ModelOutput`` comes back
as one).

Quantized linears whose weights torch's packed CPU GEMMs take run on them (``packed.py``: the
weights are repacked once, here; the constants they replace are not kept as buffers).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from lowbit.backends.torch import packed, run_dtype
from lowbit.frontend.trace import TracedModel
from lowbit.ir.graph import Graph
from lowbit.ir.interpreter import Executor, node_callable
from lowbit.ir.printer import print_graph


class _Buffers(Mapping):
    """Constant name → the module's current buffer (follows ``.to(device)``), or for a constant
    kept in its file, the tensor read from it now."""

    def __init__(self, module: torch.nn.Module, names: dict[str, str], lazy: set[str], store):
        self.module = module
        self.names = names
        self.lazy = lazy
        self.store = store

    def __getitem__(self, key: str) -> torch.Tensor | None:
        if key in self.lazy:  # read now, onto the device (and float dtype) the module was moved to
            probe, tensor = self.module._device_probe, self.store[key]
            changed = tensor.dtype in run_dtype.WIDE_FLOATS and self.module._run_dtype() is not None \
                and key not in self.module._quantizer_constants  # as _apply keeps them
            return tensor.to(probe.device, probe.dtype if changed else tensor.dtype)
        name = self.names.get(key)
        return None if name is None else getattr(self.module, name)  # None: repacked, not read

    def __iter__(self) -> Iterator[str]:
        return iter([*self.names, *self.lazy])

    def __len__(self) -> int:
        return len(self.names) + len(self.lazy)


def buffer_name(prefix: str, i: int, name: str) -> str:
    return f"{prefix}{i}_" + "".join(ch if ch.isalnum() else "_" for ch in name)[-48:]


class CompiledModule(torch.nn.Module):
    """``pack=False``: every node runs its reference op (no packed CPU GEMMs)."""

    def __init__(self, traced: TracedModel, records: list | None = None, pack: bool = True):
        super().__init__()
        self.traced = traced
        self.records = records or []
        # a subclass with its own dispatch (TritonModule) packs for its own kernels instead
        pack = pack and type(self)._override is CompiledModule._override
        self._cpu_packed = packed.consumed_constants(self.graph) if pack else set()
        self._buffer_names: dict[str, str] = {}
        self._lazy: set[str] = set()  # constants left in their files (a model compiled from a folder)
        # follows .to(device) / .half(): where and in which float dtype the graph runs
        self._traced_dtype = run_dtype.traced_float_dtype(self.graph)
        self._quantizer_constants = run_dtype.quantizer_constants(self.graph)
        self.register_buffer("_device_probe", torch.empty(0, dtype=self._traced_dtype), persistent=False)
        store = self.graph.tensors
        for i, name in enumerate(store):
            if not self._keeps_constant(name):
                continue
            if store.is_lazy(name):
                self._lazy.add(name)
            else:
                self.register_buffer(buffer_name("c", i, name), store[name])
                self._buffer_names[name] = buffer_name("c", i, name)
        self.cpu_kernels = packed.prepare_all(self.graph) if pack else torch.nn.ModuleDict()
        self._executor: Executor | None = None

    def _keeps_constant(self, name: str) -> bool:
        """Whether the graph's constant ``name`` is held as a buffer (a backend that repacks a
        weight keeps only its packed form)."""
        return name not in self._cpu_packed

    def _override(self, node):
        """A backend's own function for ``node`` (and its keyword arguments), or None for the
        op's reference."""
        key = packed.key(node)
        return (self.cpu_kernels[key], {}) if key in self.cpu_kernels else None

    def kernel_nodes(self) -> dict[str, str]:
        """Node result name → the packed CPU GEMM it runs on ("int8pack_mm", "int4pack_mm") for
        inputs that ``packed.fits`` (on the CPU; bfloat16, or float32/float16 of a row or two);
        other inputs run the node's reference."""
        return {node.result.name: self.cpu_kernels[packed.key(node)].kernel for node in self.graph.nodes
                if packed.key(node) in self.cpu_kernels}

    @property
    def graph(self) -> Graph:
        return self.traced.graph

    def _run_dtype(self) -> torch.dtype | None:
        """The float dtype the module was moved to, when it is not the one it was traced in."""
        dtype = self._device_probe.dtype
        return None if dtype == self._traced_dtype else dtype

    def _dispatch(self, node):
        """What the executor calls for ``node``: the backend's function or the op's reference
        (tensors it creates made on the module's device). Where the module was moved to another
        float dtype (``run_dtype``): float operands brought to one dtype, and on the activation
        path the traced float dtype in the node's attributes (a dequantize's output) and the
        range of its float literals (a fill value) those of the run dtype."""
        dtype = self._run_dtype()
        on_path = dtype is not None and id(node) in self._active
        limit = torch.finfo(dtype).max if on_path else None
        fn, kwargs = self._override(node) or node_callable(node, str(self._device_probe.device), limit)
        if dtype is None:
            return fn, kwargs
        if on_path:
            return run_dtype.casting(fn, dtype), run_dtype.retyped(kwargs, self._traced_dtype, dtype)
        return run_dtype.casting(fn, None), kwargs

    def _plan(self) -> Executor:
        if self._executor is None or self._executor.version != self.graph.version:
            self._active = run_dtype.activation_nodes(self.graph) if self._run_dtype() is not None else set()
            self._executor = Executor(self.graph, _Buffers(self, self._buffer_names, self._lazy, self.graph.tensors),
                                      self._dispatch)
        return self._executor

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ...: quantizer scales and zero points, and fp8 codes, move
        with the module but keep their dtype (``run_dtype.keeping_dtype``)."""
        self._executor = None  # planned for the old device and dtype
        kept = {id(getattr(self, self._buffer_names[name])) for name in self._quantizer_constants
                if name in self._buffer_names}
        return super()._apply(lambda t: run_dtype.keeping_dtype(fn, t, id(t) in kept), recurse)

    def forward(self, *args, **kwargs):
        leaves = self.traced.flatten_inputs(args, kwargs)
        with torch.no_grad():
            decoder = self.traced.decoder
            outputs = self._plan().run(leaves) if decoder is None else decoder.run_prompt(leaves, self._plan().run)
        return self.traced.unflatten_outputs(outputs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """Prompt + generated tokens, as transformers' ``generate`` returns them (see
        ``lowbit.generate.generate`` for the options: ``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``pad_token_id``, ``generator``)."""
        from lowbit.generate import generate

        return generate(self, input_ids, attention_mask, **options)

    def cache_bytes_per_token(self) -> int:
        """Bytes of key/value cache per generated token and sequence, all layers together."""
        from lowbit.generate import cache_bytes_per_token

        if self.traced.decoder is None:
            raise ValueError("this compiled model has no key/value cache")
        return cache_bytes_per_token(self.graph, self.traced.decoder)

    def save(self, directory):
        """Write this model to a folder ``lowbit.load`` reads back without the model's code or
        calibration data (``lowbit.saving``); returns the folder."""
        from lowbit.saving import save

        return save(self.traced, directory)

    def save_pretrained(self, directory, format: str = "compressed-tensors", tokenizer=None, source_dir=None):
        """Write a checkpoint other runtimes load: ``format="compressed-tensors"`` (a transformers
        causal LM; vLLM, SGLang and transformers read it, see
        ``lowbit.backends.compressed_tensors``); the tokenizer's files from ``tokenizer`` or
        ``source_dir``. Returns the folder. (``save`` writes lowbit's own format.)"""
        if format != "compressed-tensors":
            raise ValueError(f"format={format!r}: lowbit writes 'compressed-tensors' checkpoints "
                             "(and its own format with save())")
        from lowbit.backends.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(self.traced, directory, tokenizer=tokenizer, source_dir=source_dir)

    def export_genai(self, out_dir, tokenizer=None, source_dir=None, hadamard: str = "matmul"):
        """Write a folder ONNX Runtime GenAI loads (``lowbit.backends.onnx.genai``)."""
        from lowbit.backends.onnx.genai import export_genai

        return export_genai(self.traced, out_dir, tokenizer=tokenizer, source_dir=source_dir, hadamard=hadamard)

    def export_onnx(self, path, opset: int | None = None, attention_op: bool = True, hadamard: str = "matmul",
                    sparse_attention: str = "dense"):
        """Write this module's graph as ONNX (see ``lowbit.backends.onnx.export_onnx``);
        returns the path and which initializers hold quantized weights."""
        from lowbit.backends.onnx import export_onnx

        return export_onnx(self.traced, path, opset, attention_op, hadamard, sparse_attention)

    def ir(self) -> str:
        """The printed graph this module runs."""
        return print_graph(self.graph)
