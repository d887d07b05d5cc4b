"""IR → ONNX, through ``torch.onnx.export(dynamo=True)`` so that every ATen op reuses the
existing torch/onnxscript translations, while lowbit's quantized ops become the QDQ and
integer patterns ONNX Runtime fuses (see ``ops.py``).

    path = export_onnx(compiled.traced, "out/model.onnx")

Steps: fuse quantized linears in a copy of the graph; store their weights [in, out]; trace a
module that runs that graph with the quantized ops as custom ops; translate; store int4
weights as INT4 initializers; save atomically (external data past 2 GB).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import onnx
import onnx_ir as ir
import torch
from torch.onnx._internal.exporter._core import TorchTensor

from lowbit.backends.onnx import ops
from lowbit.backends.onnx import sparse_attention as sparse
from lowbit.errors import LowbitError
from lowbit.frontend import Dim
from lowbit.frontend.noise import quiet
from lowbit.frontend.trace import TracedModel
from lowbit.ir.graph import Graph, Node
from lowbit.ir.interpreter import Executor
from lowbit.ir.parser import clone_graph
from lowbit.ir.types import DType, TensorType
from lowbit.passes.lower import FuseQuantizedLinear
from lowbit.passes.base import PassContext

TWO_GB = 2**31
# Constants this large are traced as zero-stride stand-ins and read when written (see build_onnx).
STANDIN_MIN_ELEMENTS = 1 << 16
# The lowest opset that holds what a model uses: 18 is the oldest torch's exporter translates to
# natively (per-axis int8/uint8 QuantizeLinear exists since 13); float8 types need 19; int4 types
# and blocked DequantizeLinear need 21.
BASE_OPSET, FP8_OPSET, INT4_OPSET = 18, 19, 21


def lowest_opset(graph: Graph) -> int:
    """The lowest opset that holds the element types of ``graph``'s values."""
    dtypes = {v.tensor_type.dtype for n in graph.nodes for v in (*n.operands, *n.results)
              if v is not None and isinstance(v.type, TensorType)}
    if dtypes & {DType.i4, DType.u4}:
        return INT4_OPSET
    if dtypes & {DType.f8e4m3, DType.f8e5m2}:
        return FP8_OPSET
    return BASE_OPSET


@dataclass
class ExportedWeights:
    """Which ONNX initializers hold quantized weights, and the layer each belongs to."""

    layers: dict[str, str]      # initializer name → module path of its linear
    int4: dict[str, DType]      # initializer name → i4/u4 (stored as int8 until written)


# Masked attention scores are floored here rather than at the dtype's minimum. ONNX Runtime's
# CPU softmax computes exp(score - max); for arguments below about -87 the result is a float32
# denormal, and the denormals then flowing through the probability × V product make a masked
# MultiHeadAttention ~3× slower (measured: 4.9 ms vs 1.6 ms per MiniLM layer at batch 8 × 128).
# A floor of -60 keeps exp() normal while a masked key's weight stays below e^-40 of the largest
# whenever its raw score is within 20 of the row maximum — far under float32 resolution.
MASK_FLOOR = -60.0


def _buffer_name(i: int, name: str) -> str:
    return f"c{i}_" + "".join(ch if ch.isalnum() else "_" for ch in name)[-60:]


class _ExportModule(torch.nn.Module):
    """Runs a lowered graph with quantized ops as custom ops; inputs/outputs flat.

    Constants of at least ``STANDIN_MIN_ELEMENTS`` are registered as zero-stride stand-ins of
    their export shape (no memory; torch.export never reads a buffer's values); ``sources``
    gives each stand-in's buffer name → the function that reads its real data when the ONNX
    initializer is written."""

    def __init__(self, graph: Graph, transposed: set[str], attention_op: bool = True, hadamard: str = "matmul",
                 sparse_attention: str = "dense"):
        super().__init__()
        self.graph = graph
        self.attention_op = attention_op  # sdpa → com.microsoft.MultiHeadAttention
        self.hadamard = hadamard
        self.sparse = sparse_attention == "contrib"  # attn.block_sparse_sdpa → SparseAttention
        self.names: dict[str, str] = {}
        self.sources: dict[str, Callable[[], torch.Tensor]] = {}
        for i, name in enumerate(graph.tensors):
            self.names[name] = buf = _buffer_name(i, name)
            shape, dtype = graph.tensors.meta(name)
            flip = name in transposed
            if math.prod(shape) >= STANDIN_MIN_ELEMENTS:
                shape = tuple(reversed(shape)) if flip else shape
                self.register_buffer(buf, torch.zeros((), dtype=dtype).expand(shape))
                self.sources[buf] = functools.partial(_export_data, graph.tensors, name, flip)
            else:
                self.register_buffer(buf, _export_data(graph.tensors, name, flip))
        # per-token linears on ONNX Runtime's integer kernel: colsum(W_q) for the symmetric ones,
        # W_q with its zero-point rows appended for the asymmetric ones (see ops.py)
        self.colsums: dict[int, str] = {}
        self.extended: dict[int, tuple[str, int]] = {}  # node → (buffer, rows appended)
        self.extended_of: dict[str, str] = {}  # that buffer → the weight's own buffer
        for node in graph.nodes:
            if _on_integer_kernel(node):
                name = str(node.operand(1).producer.attrs["name"])
                flip = name in transposed
                w = _export_data(graph.tensors, name, flip)
                colsum = w.to(torch.int32).sum(0)
                rows = None if node.attrs.get("symmetric", True) else ops.zero_point_rows(colsum, w.shape[0])
                if rows is None:
                    self.colsums[id(node)] = f"colsum_{len(self.colsums)}"
                    self.register_buffer(self.colsums[id(node)], colsum)
                else:
                    buf = f"{self.names[name]}_zero_rows"
                    self.extended[id(node)], self.extended_of[buf] = (buf, len(rows)), self.names[name]
                    if w.numel() >= STANDIN_MIN_ELEMENTS:
                        self.register_buffer(buf, torch.zeros((), dtype=w.dtype).expand(len(w) + len(rows), w.shape[1]))
                        self.sources[buf] = functools.partial(_appended, graph.tensors, name, flip, rows)
                    else:
                        self.register_buffer(buf, torch.cat([w, rows]))
                del w

    def forward(self, *inputs):
        constants = {name: getattr(self, buf) for name, buf in self.names.items()}
        return tuple(Executor(self.graph, constants, self._override).run(list(inputs)))

    def _override(self, node: Node):
        if node.op == "quant.quantize" and node.attrs.get("axis") is None:
            q = node.attrs["dtype"].short
            return (lambda x, s, z: ops.quantize(x, s, z, q)), {}
        if node.op == "quant.dequantize" and node.attrs.get("axis") is None and \
                node.operands[0].producer.op == "quant.quantize":
            q = node.operand(0).tensor_type.dtype.short
            return (lambda x, s, z: ops.dequantize(x, s, z, q)), {}
        if node.op == "quant.linear":
            block = node.attrs.get("group_size") or 0
            q = node.operand(1).tensor_type.dtype.short
            return (lambda x, w, s, z, b: _as_3d(x, lambda x3: ops.qlinear(x3, w, s, z, b, block, q))), {}
        if _on_integer_kernel(node):
            sym = bool(node.attrs.get("symmetric", True))
            if id(node) in self.extended:
                buf, rows = self.extended[id(node)]
                w_rows = getattr(self, buf)
                return (lambda x, w, s, z, b: ops.dynamic_qlinear(x, w_rows, s, None, b, sym, rows)), {}
            colsum = getattr(self, self.colsums[id(node)])
            return (lambda x, w, s, z, b: ops.dynamic_qlinear(x, w, s, colsum, b, sym, 0)), {}
        if node.op == "quant.dynamic_linear" and not node.attrs.get("hadamard"):
            return self._dynamic_then_qlinear(node)
        if node.op == "core.rms_norm" and node.operands[1] is not None and node.operand(0).tensor_type.dtype.is_float:
            eps = float(node.attrs.get("eps", 1e-6))
            return (lambda x, w: ops.rms_norm(x, w, eps)), {}
        if node.op == "core.layer_norm" and _last_axis_f32(node):
            eps = float(node.attrs.get("eps", 1e-5))
            return (lambda x, w, b: ops.layer_norm(x, w, b, eps)), {}
        if node.op == "core.gelu" and node.operand(0).tensor_type.dtype in (DType.f32, DType.f16):
            approximate = str(node.attrs.get("approximate", "none"))
            return (lambda x: ops.gelu(x, approximate)), {}
        if node.op == "core.sdpa" and self.attention_op:
            return self._attention(node)
        if node.op == "attn.block_sparse_sdpa" and self.sparse and sparse.misfit(node) is None:
            return sparse.lowering(node)
        if node.op == "rotate.hadamard" and self.hadamard == "matmul":
            return _hadamard_matmul, {}
        return None  # "staged": the op's own butterfly, traced as reshape/slice/add/sub

    def _dynamic_then_qlinear(self, node: Node):
        """Any other dynamic linear (int4 groups, asymmetric weights): the activation quantized
        and dequantized per token (standard ops), then the weight's DequantizeLinear → MatMul."""
        from lowbit.ir.dialects.quant import dequantize, dynamic_quantize

        block = node.attrs.get("group_size") or 0
        q = node.operand(1).tensor_type.dtype.short
        act, sym = node.attrs["act_dtype"], bool(node.attrs.get("symmetric", True))
        clip = float(node.attrs.get("clip", 1.0))

        def linear(x, w, s, z, b):
            xq, xs, xz = dynamic_quantize(x, dtype=act, symmetric=sym, clip=clip)
            x = dequantize(xq, xs, None if sym else xz, axis=None, group_size=None, out_dtype=DType.from_torch(x.dtype))
            return _as_3d(x, lambda x3: ops.qlinear(x3, w, s, z, b, block, q))
        return linear, {}

    def _attention(self, node: Node):
        """sdpa as MultiHeadAttention where it fits: 4-D, static head counts, not causal, values
        as wide as keys (the kernel takes one head size; LeViT's values are wider); grouped
        heads (``gqa``) as one head per group over the group's query rows (a mask shared by the
        heads); a boolean mask becomes an additive bias."""
        q, k, v = (node.operand(i).tensor_type for i in range(3))
        mask = node.operands[3].tensor_type if node.operands[3] is not None else None
        grouped = bool(node.attrs.get("gqa"))
        if (q.rank != 4 or not isinstance(q.shape[1], int) or not isinstance(k.shape[1], int)
                or v.rank != 4 or v.shape[3] != k.shape[3]
                or node.attrs.get("causal") or (k.shape[1] != q.shape[1]) != grouped
                or (grouped and mask is not None and mask.shape[1] != 1)):
            return None
        group = q.shape[1] // k.shape[1]
        d = q.shape[3]
        scale = node.attrs.get("scale")
        scale = float(scale) if scale is not None else 1.0 / float(d) ** 0.5 if isinstance(d, int) else None
        if scale is None:
            return None

        def attention(q, k, v, mask):
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, MASK_FLOOR).to(q.dtype)
            elif mask is not None:
                mask = mask.clamp(min=MASK_FLOOR)
            if group == 1:
                return ops.mha(q, k, v, mask, scale)
            # grouped-query: a group's query heads are one head's rows (no copies of its keys)
            b, h, s, d = q.shape
            rows = q.reshape(b, h // group, group * s, d)
            bias = None if mask is None else mask.expand(-1, -1, s, -1).repeat(1, 1, group, 1)
            out = ops.mha(rows, k, v, bias, scale).reshape(b, h, s, v.shape[-1])
            return out.transpose(1, 2).contiguous().transpose(1, 2)  # sdpa's memory layout

        return attention, {}


HADAMARD_LOWERINGS = ("matmul", "staged")


def _hadamard_matmul(x: torch.Tensor) -> torch.Tensor:
    """x·H_nᵀ/√n as one MatMul per Kronecker factor of H_n (its bases and H_{2^k}), each on
    its axis of the reshaped row."""
    from lowbit.ir.dialects.hadamard import hadamard_transform

    return hadamard_transform(x, butterflies=False)


def _last_axis_f32(node: Node) -> bool:
    """A float32 LayerNorm over the last axis alone, of a known width."""
    t = node.operand(0).tensor_type
    shape = list(node.attrs.get("normalized_shape") or [])
    return t.dtype == DType.f32 and len(shape) == 1 and isinstance(t.shape[-1], int) and shape[0] == t.shape[-1]


def _on_integer_kernel(node: Node) -> bool:
    """A per-token linear that ONNX Runtime's MatMulIntegerToFloat computes as compiled: int8
    per-channel weights without zero points, 8-bit activations over their full range."""
    return (node.op == "quant.dynamic_linear" and node.attrs.get("group_size") is None
            and node.operand(1).tensor_type.dtype == DType.i8 and node.operands[3] is None
            and node.attrs["act_dtype"] in (DType.i8, DType.u8) and node.attrs.get("clip", 1.0) == 1.0)


def _as_3d(x: torch.Tensor, fn) -> torch.Tensor:
    """Run ``fn`` on x with a leading unit dim if x is 2-D: ONNX Runtime turns a 2-D MatMul + Add
    into Gemm before its QDQ fusion, and leaves a quantized Gemm in float."""
    return fn(x.unsqueeze(0)).squeeze(0) if x.dim() == 2 else fn(x)


def _export_data(store, name: str, transpose: bool) -> torch.Tensor:
    """A constant as the ONNX initializer holds it: read (from its file, if lazy) and, for a
    quantized linear's weight, scale and zero point, stored [in, out] for MatMul."""
    t = store[name]
    return t.t().contiguous() if transpose else t


def _appended(store, name: str, transpose: bool, rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([_export_data(store, name, transpose), rows])


def lower_for_export(traced: TracedModel) -> tuple[Graph, ExportedWeights, set[str]]:
    """The fused graph, which initializers hold quantized weights, and the constants stored
    transposed (quantized linears' 2-D weights, scales and zero points: [in, out] for MatMul).
    The graph shares its constants with ``traced``: nothing is read here."""
    graph = clone_graph(traced.graph, share_tensors=True)  # the fusion only rewires nodes
    FuseQuantizedLinear().run(graph, PassContext())
    layers, int4, transposed = {}, {}, set()
    names = {name: _buffer_name(i, name) for i, name in enumerate(graph.tensors)}
    for node in graph.nodes:
        if node.op in ("quant.linear", "quant.dynamic_linear"):
            for v in node.operands[1:4]:  # per-channel scales are 1-D: unchanged
                if v is not None and len(graph.tensors.meta(str(v.producer.attrs["name"]))[0]) == 2:
                    transposed.add(str(v.producer.attrs["name"]))
            w = node.operand(1)
            name = names[str(w.producer.attrs["name"])]
            layers[name] = node.loc.module or node.results[0].name
            dtype = w.tensor_type.dtype
            if dtype in (DType.i4, DType.u4):
                int4[name] = dtype
                if node.operands[3] is not None:
                    int4[names[str(node.operand(3).producer.attrs["name"])]] = dtype
        elif node.op == "quant.dequantize" and graph.is_constant(node.operand(0)) \
                and node.operand(0).tensor_type.dtype in (DType.i4, DType.u4):  # a weight no linear reads: MoE experts
            for v in (node.operand(0), node.operands[2] if len(node.operands) > 2 else None):
                if v is not None:
                    int4[names[str(v.producer.attrs["name"])]] = node.operand(0).tensor_type.dtype
    return graph, ExportedWeights(layers, int4), transposed


def _dynamic_shapes(traced: TracedModel) -> tuple:
    dims: dict[str, Dim] = {}
    shapes = []
    for v in traced.graph.inputs:
        spec = {}
        for axis, d in enumerate(v.tensor_type.shape):
            if isinstance(d, str) and d.isidentifier():
                lo, hi = traced.dim_ranges.get(d, (0, None))
                if d not in dims:
                    dims[d] = Dim(d, min=max(lo, 1), max=hi) if hi else Dim(d, min=max(lo, 1))
                spec[axis] = dims[d]
            elif isinstance(d, str):  # a dim derived from others (Bloom's mask: past+seq): torch.export works it out
                spec[axis] = Dim.AUTO
        shapes.append(spec or None)
    return tuple(shapes)


def build_onnx(traced: TracedModel, opset: int | None = None, attention_op: bool = True,
               hadamard: str = "matmul", sparse_attention: str = "dense") -> tuple[ir.Model, ExportedWeights]:
    """The ONNX model for ``traced`` (an ``onnx_ir`` model: ``ir.to_proto`` gives the proto).
    ``attention_op`` lowers attention to ONNX Runtime's MultiHeadAttention contrib op where it
    fits (else the standard decomposition); ``sparse_attention="contrib"`` lowers block-sparse
    attention to its SparseAttention op (see ``sparse_attention.py``; the model then takes and
    returns key/value caches).

    Large initializers are not held: they are traced as stand-ins and read from the compiled
    model's constants (its files, for a model compiled from a folder) when written, one at a
    time, so exporting a model takes about one weight's memory beyond the compiled model."""
    _check_choice("hadamard lowering", hadamard, HADAMARD_LOWERINGS)
    _check_choice("sparse attention lowering", sparse_attention, sparse.LOWERINGS)
    if sparse_attention == "contrib" and traced.decoder is not None:
        raise LowbitError("com.microsoft.SparseAttention keeps its own key/value cache: compile the model "
                          "without lowbit's (lowbit.compile(..., cache=False); the CLI does so for "
                          "--sparse-attention contrib)")
    graph, weights, transposed = lower_for_export(traced)
    if sparse_attention == "contrib":
        _check_sparse_fit(graph)
    need = lowest_opset(graph)
    if opset is not None and opset < need:
        raise ValueError(f"opset {opset} cannot hold this model's types: it needs opset {need} or later")
    module = _ExportModule(graph, transposed, attention_op, hadamard, sparse_attention).eval()
    for buf, own in module.extended_of.items():  # the file holds the extended weight, not its own
        weights.layers[buf] = weights.layers.pop(own)
    example = _example_spanning_blocks(traced, graph)
    with ops.target_opset(opset or need), quiet():
        program = torch.onnx.export(
            module, example, dynamo=True, dynamic_shapes=(_dynamic_shapes(traced),),  # forward(*inputs)
            input_names=traced.input_names(), output_names=traced.output_names(),
            custom_translation_table={**_library_translations(), **ops.TRANSLATIONS, **sparse.TRANSLATIONS},
            opset_version=opset or need,
            optimize=False, verbose=False)
        _bind_sources(program.model, module)
        program.optimize()  # after binding: a folded Transpose of a weight reads the weight
    model = program.model
    _int4_initializers(model, weights.int4, module.sources)
    if sparse_attention == "contrib":  # a small model's path: its proto is rewritten in memory
        proto = ir.to_proto(model)
        sparse.add_cache_io(proto)
        model = ir.from_proto(proto)
    return model, weights


def _bind_sources(model: ir.Model, module: _ExportModule) -> None:
    """Give each stand-in initializer its real data, read when the initializer is written."""
    standins = {id(getattr(module, buf)): buf for buf in module.sources}
    for name, value in model.graph.initializers.items():
        if name in module.sources:
            tensor = value.const_value
            value.const_value = ir.LazyTensor(functools.partial(_ir_tensor, module.sources[name]), tensor.dtype,
                                              tensor.shape, name=name)
        elif id(getattr(value.const_value, "raw", None)) in standins:
            raise LowbitError(f"ONNX export: initializer {name!r} holds the stand-in of constant "
                              f"{standins[id(value.const_value.raw)]!r} under another name; lowbit cannot "
                              "write its data")


def _ir_tensor(source: Callable[[], torch.Tensor], int4: DType | None = None) -> ir.Tensor:
    t = source().contiguous()
    if int4 is not None:
        np_type = ml_dtypes.int4 if int4 == DType.i4 else ml_dtypes.uint4
        return ir.Tensor(t.numpy().astype(np_type), dtype=ir.DataType.INT4 if int4 == DType.i4 else ir.DataType.UINT4)
    return TorchTensor(t)


def _int4_initializers(model: ir.Model, int4: dict[str, DType],
                       sources: dict[str, Callable[[], torch.Tensor]]) -> None:
    """Quantized weights (traced as int8) stored and typed INT4/UINT4, packed two to a byte."""
    kinds = {DType.i4: ir.DataType.INT4, DType.u4: ir.DataType.UINT4}
    for name, value in model.graph.initializers.items():
        if name in int4:
            old = value.const_value
            source = sources.get(name) or functools.partial(torch.from_numpy, old.numpy())
            value.const_value = ir.LazyTensor(functools.partial(_ir_tensor, source, int4[name]), kinds[int4[name]],
                                              old.shape, name=name)
            value.dtype = kinds[int4[name]]


def _library_translations() -> dict:
    """The ONNX translations a model library ships for its own torch custom ops (transformers'
    MoE ``grouped_mm_fallback``): the op then exports as the library meant it. ATen entries are
    left to torch's exporter."""
    try:
        from transformers.exporters.exporter_onnx import _ONNX_TRANSLATION_TABLE as table
    except Exception:  # an older transformers, or no onnxscript: those ops cannot export
        return {}
    return {op: fn for op, fn in table.items() if getattr(op, "namespace", "aten") != "aten"}


def _example_spanning_blocks(traced: TracedModel, graph: Graph) -> tuple:
    """The example inputs, tiled along each attention's sequence dim to span more than one
    block of its block-sparse attention (and of a few tokens past a block edge). Traced at a
    single block, torch.export takes the block count for the constant 1 and the ONNX graph
    silently computes wrong masks at longer inputs."""
    example = list(traced.export_leaves())
    want: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "attn.block_mask":
            for v in node.operands[:2]:
                d = v.tensor_type.shape[2]
                if isinstance(d, str):
                    want[d] = max(want.get(d, 0), 2 * int(node.attrs.get("block", 64)) + 3)
    for d, n in want.items():
        n = min(n, traced.dim_ranges.get(d, (0, None))[1] or n)
        for i, v in enumerate(traced.graph.inputs):
            for axis, name in enumerate(v.tensor_type.shape):
                if name == d and example[i].shape[axis] < n:
                    reps = -(-n // example[i].shape[axis])
                    example[i] = torch.cat([example[i]] * reps, axis).narrow(axis, 0, n)
    return tuple(example)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} {value!r}: choose one of {', '.join(choices)}")


def _check_sparse_fit(graph: Graph) -> None:
    """SparseAttention was asked for: every block-sparse attention must fit it, or the export
    says which does not and why (a silent dense fallback would hide the missing speed-up)."""
    nodes = [n for n in graph.nodes if n.op == "attn.block_sparse_sdpa"]
    if not nodes:
        raise LowbitError("sparse attention lowering 'contrib': the graph has no attn.block_sparse_sdpa "
                          "(run the sparse-attention pass first)")
    misses = [(n, sparse.misfit(n)) for n in nodes]
    misses = [f"%{n.results[0].name} at {n.loc.module or '<no module>'}: {why}" for n, why in misses if why]
    if misses:
        raise LowbitError("these block-sparse attentions cannot lower to com.microsoft.SparseAttention:\n  "
                          + "\n  ".join(misses))
    cuda = {sparse.cuda_misfit(n) for n in nodes} - {None}
    if cuda:
        warnings.warn("com.microsoft.SparseAttention will run on ONNX Runtime's CPU kernel only: "
                      + "; ".join(sorted(cuda)), stacklevel=4)


def save_atomically(model: ir.Model | onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (external data beside it past 2 GB) via a temporary folder.
    Initializers are written one at a time (an ``ir.Model``'s lazily read ones are read then)."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = _tensor_bytes(model) > TWO_GB
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        target = tmp / path.name
        if large:
            ir.save(model, target, external_data=f"{path.name}.data", size_threshold_bytes=1024)
        else:
            ir.save(model, target)
        for f in sorted(tmp.iterdir(), key=lambda p: p.suffix != ".data"):  # data before the model
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def export_onnx(traced: TracedModel, path: str | os.PathLike, opset: int | None = None,
                attention_op: bool = True, hadamard: str = "matmul",
                sparse_attention: str = "dense") -> tuple[Path, ExportedWeights]:
    model, weights = build_onnx(traced, opset, attention_op, hadamard, sparse_attention)
    return save_atomically(model, path), weights


__all__ = ["ExportedWeights", "build_onnx", "export_onnx", "lower_for_export", "save_atomically"]
