"""The ``core`` dialect: the ops passes reason about (linear algebra, norms, activations,
elementwise arithmetic, softmax, attention) and ``core.constant``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import VerifyError
from lowbit.ir.attrs import AttrKind
from lowbit.ir.dialects.infer import binary, broadcast_dims, dims_equal, same_as_input, tensor
from lowbit.ir.opdef import AttrDef, define
from lowbit.ir.types import TensorType


def _no_infer(types, attrs):
    raise VerifyError("core.constant takes its type from its tensor")


@define("core.constant", attrs=[AttrDef("name", AttrKind.STR)], infer=_no_infer)
def constant(*, name):
    """A tensor held by the graph under ``name``; the interpreter supplies it."""
    raise RuntimeError("core.constant is materialized by the executor, not called")


# ---- linear algebra ----------------------------------------------------------------------

def _linear_infer(types, attrs):
    x, w = tensor(types[0], "input"), tensor(types[1], "weight")
    if w.rank != 2:
        raise VerifyError(f"linear weight must be 2-D [out, in], got {w}")
    if not dims_equal(x.shape[-1], w.shape[1]):
        raise VerifyError(f"linear input {x} does not match weight {w} (in features)")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


@define("core.linear", operands=["input", "weight", "bias?"], infer=_linear_infer)
def linear(input, weight, bias):
    """y = x·Wᵀ + b, with W laid out [out, in]."""
    return F.linear(input, weight, bias)


def _matmul_infer(types, attrs):
    a, b = tensor(types[0], "lhs"), tensor(types[1], "rhs")
    if a.rank < 2 or b.rank < 2:
        raise VerifyError(f"core.matmul needs rank ≥ 2 operands, got {a} and {b}")
    if not dims_equal(a.shape[-1], b.shape[-2]):
        raise VerifyError(f"matmul inner dims differ: {a} @ {b}")
    batch = broadcast_dims(a.shape[:-2], b.shape[:-2])
    return [TensorType(batch + (a.shape[-2], b.shape[-1]), a.dtype)]


@define("core.matmul", operands=["lhs", "rhs"], infer=_matmul_infer)
def matmul(lhs, rhs):
    return torch.matmul(lhs, rhs)


def _conv_out(size, k, s, p, d):
    if isinstance(size, int):
        return (size + 2 * p - d * (k - 1) - 1) // s + 1
    return f"(({size}+{2 * p - d * (k - 1) - 1})//{s}+1)"


def _conv2d_infer(types, attrs):
    x, w = tensor(types[0], "input"), tensor(types[1], "weight")
    if x.rank != 4 or w.rank != 4:
        raise VerifyError(f"conv2d needs 4-D input and weight, got {x} and {w}")
    spatial = tuple(
        _conv_out(x.shape[2 + i], w.shape[2 + i], attrs["stride"][i], attrs["padding"][i],
                  attrs["dilation"][i])
        for i in range(2))
    return [TensorType((x.shape[0], w.shape[0]) + spatial, x.dtype)]


@define("core.conv2d", operands=["input", "weight", "bias?"], infer=_conv2d_infer, attrs=[
    AttrDef("stride", AttrKind.INTS, (1, 1)), AttrDef("padding", AttrKind.INTS, (0, 0)),
    AttrDef("dilation", AttrKind.INTS, (1, 1)), AttrDef("groups", AttrKind.INT, 1)])
def conv2d(input, weight, bias, *, stride, padding, dilation, groups):
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def _embedding_infer(types, attrs):
    w, ids = tensor(types[0], "weight"), tensor(types[1], "indices")
    return [TensorType(ids.shape + (w.shape[1],), w.dtype)]


@define("core.embedding", operands=["weight", "indices"], infer=_embedding_infer)
def embedding(weight, indices):
    return F.embedding(indices, weight)


# ---- normalization -----------------------------------------------------------------------

@define("core.layer_norm", operands=["input", "weight?", "bias?"], infer=same_as_input, attrs=[
    AttrDef("normalized_shape", AttrKind.INTS), AttrDef("eps", AttrKind.FLOAT, 1e-5)])
def layer_norm(input, weight, bias, *, normalized_shape, eps):
    return F.layer_norm(input, list(normalized_shape), weight, bias, eps)


@define("core.rms_norm", operands=["input", "weight?"], infer=same_as_input,
        attrs=[AttrDef("eps", AttrKind.FLOAT, 1e-6)])
def rms_norm(input, weight, *, eps):
    """y = w · x / sqrt(mean(x²) + eps) over the last dim, computed in fp32."""
    h = input.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(input.dtype)
    return h if weight is None else weight * h


@define("core.batch_norm", infer=same_as_input,
        operands=["input", "weight?", "bias?", "running_mean", "running_var"],
        attrs=[AttrDef("eps", AttrKind.FLOAT, 1e-5)])
def batch_norm(input, weight, bias, running_mean, running_var, *, eps):
    """Inference-mode batch norm over dim 1."""
    return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)


# ---- activations and elementwise ---------------------------------------------------------

def _gelu_verify(node):
    if node.attrs.get("approximate", "none") not in ("none", "tanh"):
        raise VerifyError("core.gelu approximate must be 'none' or 'tanh'")


@define("core.gelu", operands=["input"], infer=same_as_input, verify=_gelu_verify,
        attrs=[AttrDef("approximate", AttrKind.STR, "none")])
def gelu(input, *, approximate):
    return F.gelu(input, approximate=approximate)


for _name, _fn in {"relu": torch.relu, "silu": F.silu, "tanh": torch.tanh,
                   "sigmoid": torch.sigmoid}.items():
    define(f"core.{_name}", operands=["input"], infer=same_as_input)(
        lambda input, _fn=_fn: _fn(input))

for _name, _fn in {"add": torch.add, "sub": torch.sub, "mul": torch.mul,
                   "div": torch.div}.items():
    define(f"core.{_name}", operands=["lhs", "rhs"], infer=binary)(
        lambda lhs, rhs, _fn=_fn: _fn(lhs, rhs))


@define("core.softmax", operands=["input"], infer=same_as_input,
        attrs=[AttrDef("dim", AttrKind.INT)])
def softmax(input, *, dim):
    return torch.softmax(input, dim)


# ---- attention ---------------------------------------------------------------------------

def _sdpa_infer(types, attrs):
    q, v = tensor(types[0], "query"), tensor(types[2], "value")
    return [TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)]


@define("core.sdpa", operands=["query", "key", "value", "mask?"], infer=_sdpa_infer, attrs=[
    AttrDef("causal", AttrKind.BOOL, False), AttrDef("scale", AttrKind.OPT_FLOAT, None),
    AttrDef("gqa", AttrKind.BOOL, False)])
def sdpa(query, key, value, mask, *, causal, scale, gqa):
    """softmax(q·kᵀ·scale + mask)·v over [batch, heads, seq, head_dim]."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                          scale=scale, enable_gqa=gqa)
