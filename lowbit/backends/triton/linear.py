"""Quantized linears prepared for the Triton kernels: weights packed once, activations quantized
by a kernel at run time.

One small ``nn.Module`` per IR node (so ``.to(device)`` moves the packed weights):

- ``IntLinear``: integer (int8 or int4-valued) or fp8 weights with one scale per output channel
  or per tensor, activations quantized per token (``quant.dynamic_linear``, optionally rotated
  first) or per tensor with calibrated constants (``quant.static_linear``) → ``scaled_mm``:
  y = (Σ_k a·w − z_a·Σ_k w) · s_a · s_w + b.
- ``Int4Linear``: int4 weights in groups along K (``quant.linear``; or ``quant.dynamic_linear``
  with group-wise weights, whose activation is quantized and dequantized per token first) →
  ``w4a16_mm``.

``prepare(node, graph)`` returns the module for a node the kernels take, or None (the node
then runs its torch reference); ``consumed(node)`` names the constants its packed form replaces.
"""

from __future__ import annotations

import torch

from lowbit.ir.dialects.quant import quantize
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.types import DType

def _const(graph: Graph, value: Value | None) -> torch.Tensor | None:
    return None if value is None else graph.tensors[str(value.producer.attrs["name"])]


def _weight(node: Node) -> tuple[Value, Value, Value | None]:
    """(weight_q, scale, zero_point) operands of a quantized linear."""
    i = 3 if node.op == "quant.static_linear" else 1
    return node.operands[i], node.operands[i + 1], node.operands[i + 2]


def _act(node: Node) -> tuple[str, DType | None]:
    if node.op == "quant.linear":
        return "float", None
    return ("static" if node.op == "quant.static_linear" else "dynamic"), node.attrs["act_dtype"]


def kind(node: Node, graph: Graph) -> str | None:
    """Which kernel module takes ``node``: "int", "int4", or None (its reference runs)."""
    if node.op not in ("quant.linear", "quant.dynamic_linear", "quant.static_linear"):
        return None
    if not all(graph.is_constant(v) for v in _weight(node) if v is not None):
        return None
    mode, adtype = _act(node)
    if mode == "dynamic" and node.attrs.get("symmetric", True) != (adtype.int_range[0] < 0):
        return None  # the kernels quantize symmetric to a signed range, asymmetric to an unsigned one
    if _integer_gemm(node, mode, adtype):
        return "int"
    return "int4" if _int4_gemm(node, mode) else None


def _integer_gemm(node: Node, mode: str, adtype: DType | None) -> bool:
    """Weights with one scale per output channel (or tensor): the scales factor out. Symmetric,
    or 4-bit with zero points (the codes less their zero point stay within int8)."""
    wq, _, zero = _weight(node)
    if mode == "float" or node.attrs.get("group_size") is not None or node.attrs.get("axis") not in (0, None):
        return False
    if zero is not None and wq.type.dtype not in (DType.i4, DType.u4):
        return False
    if wq.type.dtype in (DType.i8, DType.i4, DType.u4):
        return adtype in (DType.i8, DType.u8, DType.i4, DType.u4)
    return wq.type.dtype == DType.f8e4m3 and adtype == DType.f8e4m3 and mode == "static"


def _int4_gemm(node: Node, mode: str) -> bool:
    """int4 weights the packed GEMM takes: groups of 32/64/128 (K padded to whole groups), or per
    channel with K a multiple of 32."""
    wq = _weight(node)[0]
    k, group = wq.type.shape[-1], node.attrs.get("group_size")
    if wq.type.dtype not in (DType.i4, DType.u4) or mode == "static" or not isinstance(k, int):
        return False
    return group is None and node.attrs.get("axis") in (0, None) and k % 32 == 0 or group in (32, 64, 128)


def consumed(node: Node) -> tuple[str, ...]:
    """Graph constants a prepared node no longer reads (its packed form holds them)."""
    return tuple(str(v.producer.attrs["name"]) for v in _weight(node) if v is not None)


def prepare(node: Node, graph: Graph) -> torch.nn.Module | None:
    k = kind(node, graph)
    if k == "int":
        return IntLinear(node, graph)
    if k == "int4":
        return Int4Linear(node, graph)
    return None


def _frozen(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 scales held as their int32 bit patterns, so ``module.half()`` leaves them exact
    (the quantizer's smallest scale, 1e-8, would flush to zero in fp16)."""
    return None if t is None else t.float().contiguous().view(torch.int32)


def _thawed(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(torch.float32)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _quantize_dynamic(x2d: torch.Tensor, dtype: DType, symmetric: bool, hadamard: bool, clip: float):
    """Per-token codes (signed: uint8 q with zero z is int8 q − 128 with zero z − 128), scale, zero."""
    from lowbit.backends.triton.quantize import dynamic_quant, hadamard_quant

    fn = hadamard_quant if hadamard else dynamic_quant
    return fn(x2d, dtype.bits, symmetric, clip)


def _quantize_static(x2d: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: DType):
    """Codes of a per-tensor calibrated quantizer (``quant.quantize``), in the signed form the
    GEMM takes: (codes, scale, zero point or None). Integer codes in one kernel (``static_quant``:
    unsigned ones less 128, their zero point too); fp8 by the reference."""
    from lowbit.backends.triton.quantize import static_quant

    s = scale.float().reshape(1)
    z = None if zero is None else zero.reshape(1)
    if dtype.is_float:
        q = quantize(x2d.float(), s, z, dtype=dtype, axis=None, group_size=None)
    else:
        q = static_quant(x2d, s, z, dtype)
    if dtype in (DType.u8, DType.u4):  # unsigned codes held in uint8
        return q, s, (torch.zeros(1, dtype=torch.int32, device=q.device) if z is None else z.to(torch.int32)) - 128
    return q, s, None if z is None else z.to(torch.int32)


class IntLinear(torch.nn.Module):
    """Integer or fp8 GEMM with per-token (or per-tensor) × per-channel scales in the epilogue."""

    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        from lowbit.backends.triton.gemm import weight_sums

        wq, scale, zero = (_const(graph, v) for v in _weight(node))
        if zero is not None:  # 4-bit codes less their zero point: s·(q − z) is s times an int8 in [-15, 15]
            wq = (wq.to(torch.int16) - zero.reshape(-1, 1).to(torch.int16)).to(torch.int8)
        self.mode, self.act_dtype = _act(node)
        self.symmetric = bool(node.attrs.get("symmetric", True))
        self.clip = float(node.attrs.get("clip", 1.0))
        self.hadamard = bool(node.attrs.get("hadamard", False))
        self.fp8 = wq.dtype == torch.float8_e4m3fn
        self.register_buffer("weight", wq.contiguous())
        self.register_buffer("weight_scale", _frozen(scale.reshape(-1)))
        self.register_buffer("weight_sum", None if self.fp8 else weight_sums(wq.contiguous()))

    def forward(self, x, *operands):
        from lowbit.backends.triton.gemm import scaled_mm

        bias = operands[-1]
        x2d = _flat(x)
        if self.mode == "static":
            q, s, z = _quantize_static(x2d, operands[0], operands[1], self.act_dtype)
        else:
            q, s, z = _quantize_dynamic(x2d, self.act_dtype, self.symmetric, self.hadamard, self.clip)
            z = None if self.symmetric else z
        y = scaled_mm(q, self.weight, s.reshape(-1), _thawed(self.weight_scale),
                      bias, z if z is None else z.reshape(-1).to(torch.int32),
                      None if z is None else self.weight_sum, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Int4Linear(torch.nn.Module):
    """int4 weights packed two per byte, dequantized in the GEMM's registers."""

    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        from lowbit.backends.triton.w4a16 import pack_int4

        wq, scale, zero = (_const(graph, v) for v in _weight(node))
        self.mode, self.act_dtype = _act(node)
        self.symmetric = bool(node.attrs.get("symmetric", True))
        self.clip = float(node.attrs.get("clip", 1.0))
        self.hadamard = bool(node.attrs.get("hadamard", False))
        self.group_size = node.attrs.get("group_size")
        self.pad = -wq.shape[1] % self.group_size if self.group_size else 0  # zero inputs fill the last group
        wq = torch.nn.functional.pad(wq, (0, self.pad))
        scale = scale.float().reshape(wq.shape[0], -1)
        zero = None if zero is None else zero.float().reshape(wq.shape[0], -1)
        packed = pack_int4(wq, scale if self.group_size else scale.reshape(-1),
                           None if zero is None else (zero if self.group_size else zero.reshape(-1)),
                           self.group_size)
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", _frozen(packed.scales))
        self.register_buffer("zeros", _frozen(packed.zeros))

    def forward(self, x, *operands):
        from lowbit.backends.triton.w4a16 import w4a16_mm

        bias = operands[-1]
        x2d = _flat(x)
        if self.mode == "dynamic":  # the activation's per-token rounding, then float weights' GEMM
            q, s, z = _quantize_dynamic(x2d, self.act_dtype, self.symmetric, self.hadamard, self.clip)
            x2d = ((q.float() - z.float().reshape(-1, 1)) * s.reshape(-1, 1)).to(x.dtype)
        if self.pad:
            x2d = torch.nn.functional.pad(x2d, (0, self.pad))
        y = w4a16_mm(x2d, self.qweight, _thawed(self.scales), _thawed(self.zeros), self.group_size or 0, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])
