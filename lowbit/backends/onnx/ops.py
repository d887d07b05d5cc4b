"""Torch custom ops that stand for lowbit's quantized ops while exporting, and their ONNX
translations (onnxscript, used by ``torch.onnx.export(dynamo=True)``).

Layouts at export: a quantized linear's weight is stored [in, out] (what ONNX MatMul reads),
with per-channel scales along axis 1, or int4 groups of G along axis 0 (block_size=G), the
pattern ONNX Runtime turns into MatMulNBits. A per-token dynamic linear becomes ONNX
Runtime's MatMulIntegerToFloat on uint8 × int8 (row and column scales in its output pass).
Its zero point is one scalar, so an asymmetric row zero point z_x is taken into the integer
product itself: the codes get m more columns holding z_x, and the weight m more rows whose
column sums are −colsum(q_w) (``zero_point_rows``), so that
    x·W ≈ s_x s_w (q_x − z_x)·q_w = s_x s_w ([q_x, z_x … z_x] · [q_w; R])
exactly in int32, with no pass over the output. Where colsum(q_w) is so large that R would
add more than a quarter of the reduction, the rank-1 term (s_x z_x) ⊗ (s_w colsum(q_w)) is
subtracted after the product instead.
"""

from __future__ import annotations

import contextlib

import onnx
import onnxscript
import torch
from onnxscript import opset21 as op

from lowbit.ir.types import DType

_ONNX_TYPES = {"i8": onnx.TensorProto.INT8, "u8": onnx.TensorProto.UINT8, "i4": onnx.TensorProto.INT4,
               "u4": onnx.TensorProto.UINT4, "f8e4m3": onnx.TensorProto.FLOAT8E4M3FN,
               "f8e5m2": onnx.TensorProto.FLOAT8E5M2}


# ---- torch custom ops (reference math; the fake versions give shapes) ----------------------

@torch.library.custom_op("lowbit::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qdtype: str) -> torch.Tensor:
    from lowbit.ir.dialects.quant import quantize as ref

    return ref(x, scale, zero_point, dtype=DType[qdtype], axis=None, group_size=None)


@quantize.register_fake
def _(x, scale, zero_point, qdtype):
    return torch.empty_like(x, dtype=DType[qdtype].storage)


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qdtype: str) -> torch.Tensor:
    from lowbit.ir.dialects.quant import dequantize as ref

    return ref(q, scale, zero_point, axis=None, group_size=None, out_dtype=DType.f32)


@dequantize.register_fake
def _(q, scale, zero_point, qdtype):
    return torch.empty_like(q, dtype=torch.float32)


def _dequantize_kn(w_kn, scale, zero_point, block):
    """[in, out] codes → float, scales per out column or per (block of in, out column)."""
    w = w_kn.float()
    if block > 0:  # the last block may be short (ONNX's blocked DequantizeLinear allows it)
        s = scale.repeat_interleave(block, 0)[:w.shape[0]]
        z = zero_point.repeat_interleave(block, 0)[:w.shape[0]].float() if zero_point is not None else None
    else:
        s, z = scale, (zero_point.float() if zero_point is not None else None)
    return (w - z if z is not None else w) * s


@torch.library.custom_op("lowbit::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, w_kn: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            bias: torch.Tensor | None, block: int, qdtype: str) -> torch.Tensor:
    y = x @ _dequantize_kn(w_kn, scale, zero_point, block)
    return y + bias if bias is not None else y


@qlinear.register_fake
def _(x, w_kn, scale, zero_point, bias, block, qdtype):
    return x.new_empty((*x.shape[:-1], w_kn.shape[1]))


ZERO_POINT_ROW_BOUND = 64  # |R| ≤ 64: two adjacent products 255·64 stay within int16, which
# the u8·s8 instructions of CPUs without VNNI (vpmaddubsw) saturate at


def zero_point_rows(colsum: torch.Tensor, in_features: int) -> torch.Tensor | None:
    """int8 rows R [m, out] with R.sum(0) == −colsum and |R| ≤ ``ZERO_POINT_ROW_BOUND``, m as
    small as that allows; None where m would exceed a quarter of ``in_features`` (the rank-1
    correction is then cheaper than the longer reduction)."""
    target = -colsum.to(torch.int64)
    m = max(1, -(-int(target.abs().max()) // ZERO_POINT_ROW_BOUND)) if target.numel() else 1
    if m > max(1, in_features // 4):
        return None
    base = torch.div(target, m, rounding_mode="floor")
    extra = torch.arange(m).unsqueeze(1) < (target - base * m)  # the remainder, one unit per row
    return (base + extra).to(torch.int8)


@torch.library.custom_op("lowbit::dynamic_qlinear", mutates_args=())
def dynamic_qlinear(x: torch.Tensor, w_kn: torch.Tensor, scale: torch.Tensor, colsum: torch.Tensor | None,
                    bias: torch.Tensor | None, symmetric: bool, zero_rows: int) -> torch.Tensor:
    """``zero_rows`` > 0: w_kn's last rows are ``zero_point_rows`` (asymmetric codes only), and
    the codes are extended by as many columns of their row's zero point; else ``colsum`` is
    colsum(w_kn)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if symmetric:  # int8 codes q in [-127, 127], carried as uint8 q + 128 with zero point 128
        s = (x2.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
        z = torch.full_like(s, 128.0)
    else:
        lo = x2.amin(-1, keepdim=True).clamp_max(0)
        hi = x2.amax(-1, keepdim=True).clamp_min(0)
        s = ((hi - lo) / 255).clamp_min(1e-8)
        z = torch.round(-lo / s).clamp(0, 255)
    q = (torch.round(x2 / s) + z).clamp(0, 255)
    if zero_rows:
        acc = torch.cat([q, z.expand(-1, zero_rows)], 1) @ w_kn.float()
    else:
        acc = q @ w_kn.float() - z * colsum.float()
    y = (acc * s * scale).reshape(*x.shape[:-1], w_kn.shape[1])
    return y + bias if bias is not None else y


@dynamic_qlinear.register_fake
def _(x, w_kn, scale, colsum, bias, symmetric, zero_rows):
    return x.new_empty((*x.shape[:-1], w_kn.shape[1]))


# ---- ONNX translations ---------------------------------------------------------------------

@contextlib.contextmanager
def target_opset(version: int):
    """Emit the translations below with the ops of ONNX opset ``version`` (18 or later)."""
    global op
    saved = op
    op = getattr(onnxscript, f"opset{version}")
    try:
        yield
    finally:
        op = saved


def _zero(qdtype: str):
    return op.Constant(value=onnx.helper.make_tensor("zero", _ONNX_TYPES[qdtype], [], [0]))


def onnx_quantize(x, scale, zero_point, qdtype: str):
    return op.QuantizeLinear(x, scale, zero_point if zero_point is not None else _zero(qdtype))


def onnx_dequantize(q, scale, zero_point, qdtype: str):
    return op.DequantizeLinear(q, scale, zero_point if zero_point is not None else _zero(qdtype))


def onnx_qlinear(x, w_kn, scale, zero_point, bias, block: int, qdtype: str):
    if block > 0:
        w = op.DequantizeLinear(w_kn, scale, zero_point, axis=0, block_size=block) if zero_point is not None \
            else op.DequantizeLinear(w_kn, scale, axis=0, block_size=block)
    else:  # without a zero point DequantizeLinear takes 0 of the weight's own type
        w = op.DequantizeLinear(w_kn, scale, zero_point, axis=1) if zero_point is not None \
            else op.DequantizeLinear(w_kn, scale, axis=1)
    y = op.MatMul(x, w)
    return op.Add(y, bias) if bias is not None else y


def onnx_dynamic_qlinear(x, w_kn, scale, colsum, bias, symmetric: bool, zero_rows: int):
    """Per-token uint8 codes by one per-axis QuantizeLinear, then ONNX Runtime's
    MatMulIntegerToFloat: uint8 × int8 with the row and column scales applied in the GEMM's own
    output pass (its zero point must be one scalar). Symmetric codes are q + 128 with
    the zero point 128; asymmetric ones take the zero point 0, and their row zero points enter
    the product as ``zero_rows`` more columns of codes (see the module's docstring), or, without
    those, are corrected by the rank-1 term (s_x z_x) ⊗ (s_w colsum(W_q))."""
    from onnxscript.values import Opset

    declare_contrib_op("MatMulIntegerToFloat",
                       [("A", "T1", False), ("B", "T2", False), ("a_scale", "T", False), ("b_scale", "T", False),
                        ("a_zero_point", "T1", True), ("b_zero_point", "T2", True), ("bias", "T", True)],
                       ["Y"], [("T1", ["tensor(int8)", "tensor(uint8)"]), ("T2", ["tensor(int8)", "tensor(uint8)"]),
                               ("T", ["tensor(float)", "tensor(float16)"])], [])
    msft = Opset("com.microsoft", 1)
    # one scale (and zero point) per row of x's last axis, computed on x as it is shaped; the
    # codes by a per-axis QuantizeLinear on the rows, then back to x's shape (ONNX Runtime then
    # knows the product's shape and fuses the bias into a following BiasGelu or
    # SkipLayerNormalization)
    axes = op.Constant(value_ints=[-1])
    eps = op.Constant(value_float=1e-8)
    flat = op.Constant(value_ints=[-1])
    lo = op.ReduceMin(x, axes, keepdims=1)
    hi = op.ReduceMax(x, axes, keepdims=1)
    rows = op.Reshape(x, op.Constant(value_ints=[-1, int(w_kn.shape[0]) - zero_rows]))
    if symmetric:  # max |x| from the row's min and max: no |x| tensor
        s = op.Max(op.Div(op.Max(hi, op.Neg(lo)), op.Constant(value_float=127.0)), eps)
        z8 = op.Expand(op.Constant(value=onnx.helper.make_tensor("z", onnx.TensorProto.UINT8, [1], [128])),
                       op.Shape(rows, end=1))
        q = op.Reshape(op.QuantizeLinear(rows, op.Reshape(s, flat), z8, axis=0), op.Shape(x))
        zp = op.Constant(value=onnx.helper.make_tensor("a_zp", onnx.TensorProto.UINT8, [], [128]))
        y = msft.MatMulIntegerToFloat(q, w_kn, s, scale, zp)
    else:
        zero = op.Constant(value_float=0.0)
        lo, hi = op.Min(lo, zero), op.Max(hi, zero)
        s = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=255.0)), eps)
        z = op.Clip(op.Round(op.Div(op.Neg(lo), s)), zero, op.Constant(value_float=255.0))
        z8 = op.Reshape(op.Cast(z, to=onnx.TensorProto.UINT8), flat)
        q = op.QuantizeLinear(rows, op.Reshape(s, flat), z8, axis=0)
        if zero_rows:  # [q, z … z]: the rows' zero points as columns of codes
            width = op.Constant(value_ints=[int(w_kn.shape[0])])
            zs = op.Expand(op.Unsqueeze(z8, op.Constant(value_ints=[1])), op.Constant(value_ints=[1, zero_rows]))
            q = op.Reshape(op.Concat(q, zs, axis=1), op.Concat(op.Shape(x, end=-1), width, axis=0))
            y = msft.MatMulIntegerToFloat(q, w_kn, s, scale)
        else:
            y = msft.MatMulIntegerToFloat(op.Reshape(q, op.Shape(x)), w_kn, s, scale)
            y = op.Sub(y, op.Mul(op.Mul(s, z), op.Mul(op.Cast(colsum, to=onnx.TensorProto.FLOAT), scale)))
    # not MatMulIntegerToFloat's own bias input: ONNX Runtime scales that by a per-row a_scale
    return op.Add(y, bias) if bias is not None else y


TRANSLATIONS = {
    torch.ops.lowbit.quantize.default: onnx_quantize,
    torch.ops.lowbit.dequantize.default: onnx_dequantize,
    torch.ops.lowbit.qlinear.default: onnx_qlinear,
    torch.ops.lowbit.dynamic_qlinear.default: onnx_dynamic_qlinear,
}


# ---- attention: com.microsoft.MultiHeadAttention on the CPU ---------------------------------

@torch.library.custom_op("lowbit::mha", mutates_args=())
def mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """sdpa on [batch, heads, seq, head_dim] with an additive float bias [batch|1, heads|1, S, L].
    The result is laid out [batch, seq, heads, dim] in memory, as torch's sdpa lays it out (the
    model's following transpose + view relies on it)."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@mha.register_fake
def _(q, k, v, bias, scale):
    b, n, s, _ = q.shape
    return q.new_empty((b, s, n, v.shape[-1])).transpose(1, 2)


def declare_contrib_op(name: str, inputs: list[tuple[str, str, bool]], outputs: list[str],
                       types: list[tuple[str, list[str]]], attributes: list[tuple[str, str, bool]],
                       domain: str = "com.microsoft") -> None:
    """ONNX's schema registry does not know ONNX Runtime's contrib ops; onnxscript needs one to
    emit a node. Declare com.microsoft::``name`` (version 1) once: ``inputs`` as (name, type
    variable, optional), ``outputs`` of type T, ``attributes`` as (name, "INT"/"FLOAT", required)."""
    try:
        onnx.defs.get_schema(name, 1, domain)
        return
    except onnx.defs.SchemaError:
        pass
    S = onnx.defs.OpSchema
    option = {False: S.FormalParameterOption.Single, True: S.FormalParameterOption.Optional}
    onnx.defs.register_schema(S(
        name, domain, 1,
        inputs=[S.FormalParameter(n, t, param_option=option[o]) for n, t, o in inputs],
        outputs=[S.FormalParameter(n, "T") for n in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=[S.Attribute(n, getattr(S.AttrType, kind), "", required=r) for n, kind, r in attributes]))


def to_bsd(x):
    """[batch, heads, seq, dim] → [batch, seq, heads·dim], the layout ONNX Runtime's attention
    contrib ops take."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


def from_bsd(x, heads: int):
    """[batch, seq, heads·dim] → [batch, heads, seq, dim]."""
    shape = op.Concat(op.Shape(x, end=2), op.Constant(value_ints=[heads, -1]), axis=0)
    return op.Transpose(op.Reshape(x, shape), perm=[0, 2, 1, 3])


def onnx_mha(q, k, v, bias, scale: float):
    from onnxscript.values import Opset

    names = ["query", "key", "value", "bias", "key_padding_mask", "attention_bias"]
    declare_contrib_op("MultiHeadAttention", [(n, "M" if n == "key_padding_mask" else "T", i > 0)
                                              for i, n in enumerate(names)], ["output"],
                       [("T", ["tensor(float)", "tensor(float16)"]), ("M", ["tensor(int32)"])],
                       [("num_heads", "INT", True), ("scale", "FLOAT", True)])
    msft = Opset("com.microsoft", 1)
    heads = q.shape[1]
    # query as [batch, seq, heads·dim]; key/value stay [batch, heads, seq, dim] (measured: the
    # kernel is slower on [batch, seq, heads·dim] keys than their transposes cost)
    out = msft.MultiHeadAttention(to_bsd(q), k, v, None, None, bias, num_heads=heads, scale=scale)
    return from_bsd(out, heads)


TRANSLATIONS[torch.ops.lowbit.mha.default] = onnx_mha


# ---- RMSNorm: com.microsoft.SimplifiedLayerNormalization ------------------------------------

@torch.library.custom_op("lowbit::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from lowbit.ir.dialects.core import rms_norm as ref

    return ref(x, weight, eps=eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def onnx_rms_norm(x, weight, eps: float):
    """One SimplifiedLayerNormalization (ONNX Runtime fuses a residual Add before it into
    SkipSimplifiedLayerNormalization) instead of pow/mean/sqrt/div/mul."""
    from onnxscript.values import Opset

    declare_contrib_op("SimplifiedLayerNormalization", [("X", "T", False), ("scale", "T", False)], ["Y"],
                       [("T", ["tensor(float)", "tensor(float16)"])],
                       [("axis", "INT", False), ("epsilon", "FLOAT", False), ("stash_type", "INT", False)],
                       domain="")  # ONNX Runtime registers it in the ONNX domain
    return Opset("", 21).SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


TRANSLATIONS[torch.ops.lowbit.rms_norm.default] = onnx_rms_norm


# ---- LayerNorm: LayerNormalization on the rows, kept apart from the residual Add ------------

@torch.library.custom_op("lowbit::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


def onnx_layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis as LayerNormalization of x viewed [rows, width]. The view
    keeps ONNX Runtime from fusing a residual Add before it into SkipLayerNormalization, whose
    CPU kernel is the slow one: on MiniLM's [8, 128, 384] rows the Add, the views and
    LayerNormalization take 0.23 ms, SkipLayerNormalization 1.05 ms (and strays 2.7e-6 from a
    float64 reference, against 7e-7)."""
    width = int(x.shape[-1])
    rows = op.Reshape(x, op.Constant(value_ints=[-1, width]))
    if weight is None:
        weight = op.Constant(value_floats=[1.0] * width)
    y, _, _ = op.LayerNormalization(rows, weight, bias, axis=-1, epsilon=eps) if bias is not None \
        else op.LayerNormalization(rows, weight, axis=-1, epsilon=eps)
    return op.Reshape(y, op.Shape(x))


TRANSLATIONS[torch.ops.lowbit.layer_norm.default] = onnx_layer_norm


# ---- GELU: com.microsoft.Gelu / FastGelu --------------------------------------------------------

@torch.library.custom_op("lowbit::gelu", mutates_args=())
def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate=approximate)


@gelu.register_fake
def _(x, approximate):
    return torch.empty_like(x)


def onnx_gelu(x, approximate: str):
    """One Gelu (erf) or FastGelu (tanh) kernel instead of the five elementwise ops of the
    formula, which ONNX Runtime's own fusion does not always recognize in the exporter's order."""
    from onnxscript.values import Opset

    name = "FastGelu" if approximate == "tanh" else "Gelu"
    declare_contrib_op(name, [("X", "T", False)], ["Y"], [("T", ["tensor(float)", "tensor(float16)"])], [])
    return getattr(Opset("com.microsoft", 1), name)(x)


TRANSLATIONS[torch.ops.lowbit.gelu.default] = onnx_gelu
