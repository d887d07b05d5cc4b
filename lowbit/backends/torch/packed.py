"""Quantized linears on torch's packed CPU GEMMs, for the torch backend.

The reference ``quant.linear`` dequantizes its whole weight on every call; torch has CPU kernels
that read the integer weight as it is stored. One small ``nn.Module`` per IR node (so
``.to(device)`` moves what it holds):

- ``Int8Linear``: one scale per output channel (or per tensor), codes minus zero point within
  int8 (int8 symmetric; int4 with or without a zero point) → ``aten._weight_int8pack_mm``:
  y = (x · (W_q − z)ᵀ) · s.
- ``Int4Linear``: int4 codes in groups of 32/64/128/256 along K (a short last group padded with
  zero inputs), N a multiple of 16 (what the
  kernel takes) → ``aten._weight_int4pack_mm_for_cpu``, which computes w = (u − 8)·s + z' from
  u = q − qmin ∈ [0, 15] and one (s, z') pair per group and output: z' = (8 + qmin − z)·s.

``quant.dynamic_linear`` first quantizes and dequantizes its input per token as its reference
does, so only the weight GEMM's float rounding differs from the reference.

Whether a call runs the kernel is decided per call (``fits``): its tensors are on the CPU, and
the input is bfloat16, or float32/float16 with at most ``SCALAR_ROWS`` rows — on x86 torch
vectorizes these kernels for bfloat16 only, and their scalar loop beats dequantize + linear only
for an input of a row or two (benchmarks/torch_packed.py). Otherwise the node's reference op runs
on the module's own tensors.

``kind(node, graph)`` says which module takes a node (None: its reference runs), ``prepare`` builds
it, ``consumed_constants`` names the graph constants that then no longer need a buffer.
"""

from __future__ import annotations

import torch

from lowbit.ir.dialects.quant import dequantize, dynamic_quantize
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.interpreter import node_callable
from lowbit.ir.types import DType

SCALAR_ROWS = 2  # fp32/fp16 inputs with more rows run the reference (the kernel is a scalar loop there)
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes


def key(node: Node) -> str:
    return "n_" + "".join(ch if ch.isalnum() else "_" for ch in node.results[0].name)


def _weight(node: Node) -> tuple[Value, Value, Value | None]:
    """(weight_q, scale, zero_point) operands of ``quant.linear`` / ``quant.dynamic_linear``."""
    return node.operands[1], node.operands[2], node.operands[3]


def _const(graph: Graph, value: Value | None) -> torch.Tensor | None:
    return None if value is None else graph.tensor(value)


def kind(node: Node, graph: Graph) -> str | None:
    """Which packed GEMM takes ``node``: "int8", "int4", or None (its reference runs)."""
    if node.op not in ("quant.linear", "quant.dynamic_linear") or \
            not all(graph.is_constant(v) for v in _weight(node) if v is not None):
        return None
    wq, _, zero = _weight(node)
    shape, dtype = wq.tensor_type.shape, wq.tensor_type.dtype
    if not dtype.is_integer or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
        return None
    (n, k), (lo, hi) = shape, dtype.int_range
    if _per_channel(node, k) and (hi - lo <= 127 if zero is not None else -128 <= lo and hi <= 127):
        return "int8"
    group = node.attrs.get("group_size")
    if hi - lo <= 15 and node.attrs.get("axis") in (1, -1) and group in INT4_GROUPS and n % 16 == 0:
        return "int4"
    return None


def _per_channel(node: Node, k: int) -> bool:
    """One scale per output channel or per tensor (a single group spanning K is one per channel)."""
    axis, group = node.attrs.get("axis"), node.attrs.get("group_size")
    return group is None and axis in (0, None) or group is not None and group >= k and axis in (1, -1)


def consumed(node: Node) -> tuple[str, ...]:
    """Graph constants a prepared node no longer reads (its module holds them, or their packed form)."""
    return tuple(str(v.producer.attrs["name"]) for v in _weight(node) if v is not None)


def repacked_constants(graph: Graph, takes, consumed_by) -> set[str]:
    """Constants read only by nodes whose weights a backend repacks (``takes(node, graph)``;
    ``consumed_by(node)`` names the constants its packed form replaces): no one else needs
    them as buffers. Shared by the torch backend's packed GEMMs and the triton backend."""
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for v in node.operands:
            if graph.is_constant(v):
                readers.setdefault(str(v.producer.attrs["name"]), []).append(node)
    return {name for node in graph.nodes if takes(node, graph) for name in consumed_by(node)
            if all(takes(r, graph) for r in readers.get(name, []))}


def consumed_constants(graph: Graph) -> set[str]:
    """Constants read only by nodes a packed module takes."""
    return repacked_constants(graph, kind, consumed)


def prepare(node: Node, graph: Graph) -> torch.nn.Module | None:
    k = kind(node, graph)
    if k == "int8":
        return Int8Linear(node, graph)
    if k == "int4":
        return Int4Linear(node, graph)
    return None


def prepare_all(graph: Graph) -> torch.nn.ModuleDict:
    """A module for every node a packed GEMM takes, by ``key(node)``."""
    modules = torch.nn.ModuleDict()
    for node in graph.nodes:
        module = prepare(node, graph)
        if module is not None:
            modules[key(node)] = module
    return modules


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel runs for this call: CPU tensors, and bfloat16 (vectorized) or a
    decode-sized float32/float16 input (scalar, still faster than dequantizing the weight)."""
    if not (x.is_cpu and weight.is_cpu):
        return False
    if x.dtype == torch.bfloat16:
        return True
    return x.dtype in (torch.float32, torch.float16) and x.numel() <= SCALAR_ROWS * x.shape[-1]


def _activation(x: torch.Tensor, attrs: dict) -> torch.Tensor:
    """The input of a dynamic linear's weight GEMM, computed as its reference does: rotated
    (``hadamard``), quantized per token and dequantized."""
    if attrs["hadamard"]:
        from lowbit.ir.dialects.hadamard import hadamard_transform

        x = hadamard_transform(x)
    q, s, z = dynamic_quantize(x, dtype=attrs["act_dtype"], symmetric=attrs["symmetric"], clip=attrs.get("clip", 1.0))
    return dequantize(q, s, None if attrs["symmetric"] else z, axis=None, group_size=None,
                      out_dtype=DType.from_torch(x.dtype))


class PackedLinear(torch.nn.Module):
    """A quantized linear node: its packed GEMM when ``fits``, else its reference op on
    ``weights()``. Subclasses hold ``scale`` and define ``weights()`` (the reference's weight
    operands) and ``mm(x2d)`` (the kernel)."""

    kernel = ""

    def __init__(self, node: Node):
        super().__init__()
        self.reference, self.attrs = node_callable(node)
        self.dynamic = node.op == "quant.dynamic_linear"

    def forward(self, x: torch.Tensor, *operands):
        bias = operands[-1]  # the weight operands are None (their constants are not buffers)
        if not fits(x, self.scale):
            return self.reference(x, *self.weights(), bias, **self.attrs)
        if self.dynamic:
            x = _activation(x, self.attrs)
        y = self.mm(x.reshape(-1, x.shape[-1]).contiguous())
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias


class Int8Linear(PackedLinear):
    """W_q − z as int8 with one scale per output channel. The reference then runs on these with
    ``axis=0``: the same dequantized weight, bit for bit (W_q − z is exact in float)."""

    kernel = "int8pack_mm"

    def __init__(self, node: Node, graph: Graph):
        super().__init__(node)
        wq, scale, zero = (_const(graph, v) for v in _weight(node))
        codes = wq if zero is None else wq.to(torch.int16) - zero.reshape(-1, 1).to(torch.int16)
        self.register_buffer("weight", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(-1).expand(wq.shape[0]).contiguous())
        self.attrs = {**self.attrs, "axis": 0, "group_size": None}

    def weights(self):
        return self.weight, self.scale, None

    def mm(self, x2d):
        return torch.ops.aten._weight_int8pack_mm(x2d, self.weight, self.scale.to(x2d.dtype))


class Int4Linear(PackedLinear):
    """The node's codes, scales and zero points (saved; the reference's operands) and the kernel's
    form of them (derived: torch's CPU layout depends on the CPU's vector width)."""

    kernel = "int4pack_mm"

    def __init__(self, node: Node, graph: Graph):
        super().__init__(node)
        wq, scale, zero = (_const(graph, v) for v in _weight(node))
        self.low = node.operand(1).tensor_type.dtype.int_range[0]
        self.group_size = node.attrs["group_size"]
        self.pad = -wq.shape[1] % self.group_size  # K padded to whole groups (zero inputs)
        # codes kept in a file (a model compiled from a folder) stay there: the packed form
        # is what runs, and the reference reads them when it is needed
        name = str(node.operand(1).producer.attrs["name"])
        self._codes_file = (graph.tensors, name) if graph.tensors.is_lazy(name) else None
        self.register_buffer("weight_q", None if self._codes_file else wq)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("scale_and_zeros", None, persistent=False)
        self._pack(wq)

    def _codes(self) -> torch.Tensor:
        if self._codes_file is not None:
            store, name = self._codes_file
            return store[name].to(self.scale.device)
        return self.weight_q

    def _pack(self, codes: torch.Tensor | None = None) -> None:
        """u = q − qmin packed two per byte in the kernel's layout; [K/G, N, 2] pairs (s, z') with
        (u − 8)·s + z' = (q − z)·s, i.e. z' = (8 + qmin − z)·s."""
        wq = self._codes() if codes is None else codes
        codes = (wq.cpu().to(torch.int32) - self.low).contiguous()
        codes = torch.nn.functional.pad(codes, (0, self.pad), value=8)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).to(wq.device)
        s = self.scale.float()
        z = 0.0 if self.zero_point is None else self.zero_point.float()
        pairs = torch.stack([s, (8 + self.low - z) * s], -1)  # [N, K/G, 2]
        self.scale_and_zeros = pairs.transpose(0, 1).contiguous().to(self.scale.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._pack()  # the kernel's form follows the loaded codes and scales

    def weights(self):
        return self._codes(), self.scale, self.zero_point

    def mm(self, x2d):
        if self.pad:
            x2d = torch.nn.functional.pad(x2d, (0, self.pad))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group_size,
                                                          self.scale_and_zeros.to(x2d.dtype))
