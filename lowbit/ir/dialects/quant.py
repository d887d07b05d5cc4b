"""The ``quant`` dialect: quantize and dequantize with per-tensor, per-channel (``axis``) or
per-group (``axis`` + ``group_size``) scales.

Integer dtypes:  q = clamp(round(x / s) + z, qmin, qmax),   x̂ = (q − z) · s
fp8 dtypes:      q = fp8(clamp(x / s, −max, max)),          x̂ = float(q) · s

Sub-byte values (int4/uint4) are held in int8/uint8 tensors, one value per element.
"""

from __future__ import annotations

import torch

from lowbit.errors import VerifyError
from lowbit.ir.attrs import AttrKind
from lowbit.ir.dialects.infer import tensor
from lowbit.ir.opdef import AttrDef, define
from lowbit.ir.types import DType, TensorType

EPS = 1e-8  # smallest scale: a zero-range channel or token gets this, never a division by zero
_GRANULARITY = [AttrDef("axis", AttrKind.OPT_INT, None), AttrDef("group_size", AttrKind.OPT_INT, None)]


def expand_scale(scale: torch.Tensor, x: torch.Tensor, axis: int | None,
                 group_size: int | None) -> torch.Tensor:
    """Broadcast a per-tensor / per-channel / per-group scale (or zero point) against ``x``.

    Per channel: ``scale`` has shape [x.shape[axis]]. Per group: ``scale`` has x's shape with
    dim ``axis`` = ⌈x.shape[axis] / group_size⌉ (each group shares one scale; a last group that
    is short, when the size is not a multiple of the group, has its own scale as MatMulNBits and
    ONNX's blocked DequantizeLinear do).
    """
    if axis is None:
        return scale
    axis = axis % x.dim()
    if group_size is not None:
        return scale.repeat_interleave(group_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def _quantize_infer(types, attrs):
    x = tensor(types[0], "input")
    return [TensorType(x.shape, attrs["dtype"])]


def _quantize_verify(node):
    dtype = node.attrs["dtype"]
    if dtype.is_float and dtype not in (DType.f8e4m3, DType.f8e5m2):
        raise VerifyError(f"quant.quantize dtype must be an integer or fp8 type, got {dtype.short}")
    if node.attrs.get("group_size") is not None and node.attrs.get("axis") is None:
        raise VerifyError("quant.quantize with group_size needs an axis")


@define("quant.quantize", operands=["input", "scale", "zero_point?"], infer=_quantize_infer,
        verify=_quantize_verify, attrs=[AttrDef("dtype", AttrKind.DTYPE), *_GRANULARITY])
def quantize(input, scale, zero_point, *, dtype, axis, group_size):
    s = expand_scale(scale, input, axis, group_size)
    if dtype.is_float:
        limit = torch.finfo(dtype.storage).max
        return (input / s).clamp(-limit, limit).to(dtype.storage)
    q = torch.round(input / s)
    if zero_point is not None:
        q = q + expand_scale(zero_point, input, axis, group_size).to(q.dtype)
    lo, hi = dtype.int_range
    return q.clamp(lo, hi).to(dtype.storage)


def _dequantize_infer(types, attrs):
    x = tensor(types[0], "input")
    return [TensorType(x.shape, attrs["out_dtype"])]


@define("quant.dequantize", operands=["input", "scale", "zero_point?"], infer=_dequantize_infer,
        attrs=[*_GRANULARITY, AttrDef("out_dtype", AttrKind.DTYPE, DType.f32)])
def dequantize(input, scale, zero_point, *, axis, group_size, out_dtype):
    q = input.to(torch.float32)
    if zero_point is not None:
        q = q - expand_scale(zero_point, input, axis, group_size).to(torch.float32)
    return (q * expand_scale(scale, input, axis, group_size)).to(out_dtype.storage)


def _dynamic_infer(types, attrs):
    x = tensor(types[0], "input")
    per_token = TensorType(x.shape[:-1] + (1,), DType.f32)
    return [TensorType(x.shape, attrs["dtype"]), per_token, TensorType(per_token.shape, attrs["dtype"])]


def _dynamic_verify(node):
    _quantize_verify(node)
    _clip_verify(node)


def _clip_verify(node):
    clip = node.attrs.get("clip", 1.0)
    if not 0.0 < clip <= 1.0:
        raise VerifyError(f"{node.op} clip must be in (0, 1], got {clip}")


def _div(a: torch.Tensor, n: float) -> torch.Tensor:
    """a / n correctly rounded on every device (CUDA multiplies by 1/n when n is a Python
    number, which can differ in the last bit: the kernels and the CPU divide)."""
    return a / torch.full_like(a, n)


@define("quant.dynamic_quantize", operands=["input"], infer=_dynamic_infer, verify=_dynamic_verify,
        attrs=[AttrDef("dtype", AttrKind.DTYPE), AttrDef("symmetric", AttrKind.BOOL, True),
               AttrDef("clip", AttrKind.FLOAT, 1.0)])
def dynamic_quantize(input, *, dtype, symmetric, clip=1.0):
    """Per-token (last dim) quantization with scales computed at run time: returns
    (q, scale, zero_point), scale and zero point shaped [..., 1]. ``clip`` < 1 shrinks each
    token's range [min, max] by that ratio first (values beyond it saturate): coarse codes spent
    on the bulk of the token rather than its extremes (QuaRot clips 4-bit activations at 0.9)."""
    x = input.float()
    if dtype.is_float:  # fp8: one scale per token maps its largest magnitude to the format's max
        limit = torch.finfo(dtype.storage).max
        scale = (x.abs().amax(-1, keepdim=True) * clip / limit).clamp_min(EPS)
        return (x / scale).clamp(-limit, limit).to(dtype.storage), scale, torch.zeros_like(scale).to(dtype.storage)
    qmin, qmax = dtype.int_range
    lo = x.amin(-1, keepdim=True).clamp_max(0)
    hi = x.amax(-1, keepdim=True).clamp_min(0)
    if clip != 1.0:
        lo, hi = lo * clip, hi * clip
    if symmetric and qmin < 0 and dtype.bits < 8:
        # the larger of max x → qmax and min x → qmin: all 2^bits codes in use, none clipped and
        # no extreme on a rounding tie (at 4 bits ±max|x| → ±qmax leaves −8 unused: a step up to
        # 1/7 coarser; at 8 bits that is 1/127, and int8 keeps max|x| → 127, which the ONNX
        # export's per-token kernel and existing exports share)
        scale = torch.maximum(_div(hi, qmax), _div(lo, qmin)).clamp_min(EPS)
        zp = torch.zeros_like(scale)
    elif symmetric:
        scale = _div(torch.maximum(hi, -lo), qmax).clamp_min(EPS)
        zp = torch.zeros_like(scale)
    else:
        scale = _div(hi - lo, qmax - qmin).clamp_min(EPS)
        zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    q = (torch.round(x / scale) + zp).clamp(qmin, qmax)
    return q.to(dtype.storage), scale, zp.to(dtype.storage)


def dequantize_weight(weight_q, scale, zero_point, axis, group_size, dtype):
    w = weight_q.to(torch.float32)
    if zero_point is not None:
        w = w - expand_scale(zero_point, w, axis, group_size).to(torch.float32)
    return (w * expand_scale(scale, w, axis, group_size)).to(dtype)


def _qlinear_infer(types, attrs):
    x, w = tensor(types[0], "input"), tensor(types[1], "weight_q")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


@define("quant.linear", operands=["input", "weight_q", "scale", "zero_point?", "bias?"],
        infer=_qlinear_infer, attrs=_GRANULARITY)
def linear(input, weight_q, scale, zero_point, bias, *, axis, group_size):
    """y = x · dequantize(W_q)ᵀ + b, W_q [out, in] an integer constant (a fused DQ → linear)."""
    w = dequantize_weight(weight_q, scale, zero_point, axis, group_size, input.dtype)
    return torch.nn.functional.linear(input, w, bias)


@define("quant.dynamic_linear", operands=["input", "weight_q", "scale", "zero_point?", "bias?"],
        infer=_qlinear_infer, verify=_clip_verify,
        attrs=[AttrDef("act_dtype", AttrKind.DTYPE), AttrDef("symmetric", AttrKind.BOOL, True), *_GRANULARITY,
               AttrDef("hadamard", AttrKind.BOOL, False), AttrDef("clip", AttrKind.FLOAT, 1.0)])
def dynamic_linear(input, weight_q, scale, zero_point, bias, *, act_dtype, symmetric, axis, group_size,
                   hadamard, clip=1.0):
    """quant.linear on the input quantized per token at run time (a fused dynamic QDQ, ``clip``
    as there); ``hadamard``: the input is first rotated by H/√n (a fused ``rotate.hadamard``)."""
    if hadamard:
        from lowbit.ir.dialects.hadamard import hadamard_transform

        input = hadamard_transform(input)
    q, s, z = dynamic_quantize(input, dtype=act_dtype, symmetric=symmetric, clip=clip)
    x = dequantize(q, s, None if symmetric else z, axis=None, group_size=None, out_dtype=DType.from_torch(input.dtype))
    return linear(x, weight_q, scale, zero_point, bias, axis=axis, group_size=group_size)


def _static_infer(types, attrs):
    x, w = tensor(types[0], "input"), tensor(types[3], "weight_q")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


@define("quant.static_linear",
        operands=["input", "act_scale", "act_zero?", "weight_q", "scale", "zero_point?", "bias?"],
        infer=_static_infer, attrs=[AttrDef("act_dtype", AttrKind.DTYPE), *_GRANULARITY])
def static_linear(input, act_scale, act_zero, weight_q, scale, zero_point, bias, *, act_dtype, axis,
                  group_size):
    """quant.linear on the input quantized per tensor with calibrated constants (a fused
    static QDQ): what an integer kernel computes from x, s_x, z_x and W_q."""
    q = quantize(input, act_scale, act_zero, dtype=act_dtype, axis=None, group_size=None)
    x = dequantize(q, act_scale, act_zero, axis=None, group_size=None,
                   out_dtype=DType.from_torch(input.dtype))
    return linear(x, weight_q, scale, zero_point, bias, axis=axis, group_size=group_size)


def _pack_infer(types, attrs):
    x = tensor(types[0], "input")
    last = x.shape[-1]
    if isinstance(last, int) and last % 2:
        raise VerifyError(f"quant.pack_int4 needs an even last dim, got {x}")
    half = last // 2 if isinstance(last, int) else f"({last})//2"
    return [TensorType(x.shape[:-1] + (half,), DType.u8)]


@define("quant.pack_int4", operands=["input"], infer=_pack_infer)
def pack_int4(input):
    """Two 4-bit values per byte along the last dim: element 2i in the low nibble, 2i+1 high."""
    x = input.to(torch.int16) & 0xF
    return (x[..., 0::2] | (x[..., 1::2] << 4)).to(torch.uint8)


def _unpack_infer(types, attrs):
    x = tensor(types[0], "input")
    last = x.shape[-1]
    return [TensorType(x.shape[:-1] + (last * 2 if isinstance(last, int) else f"({last})*2",), attrs["dtype"])]


@define("quant.unpack_int4", operands=["input"], infer=_unpack_infer, attrs=[AttrDef("dtype", AttrKind.DTYPE)])
def unpack_int4(input, *, dtype):
    """The inverse of ``quant.pack_int4``: int4 values (sign-extended) or uint4, one per element."""
    x = input.to(torch.int16)
    pair = torch.stack([x & 0xF, (x >> 4) & 0xF], -1).reshape(*x.shape[:-1], -1)
    if dtype == DType.i4:
        pair = (pair ^ 8) - 8
    return pair.to(dtype.storage)
