"""Canonicalization patterns: ATen idioms → the core ops passes reason about.

- addmm-to-linear: ``addmm(b, x, W)`` with constant W [in, out] → ``linear(x, Wᵀ, b)`` (also
  ``mm`` and ``matmul(x, W)``: Falcon's bias-free linears are ``x @ Wᵀ``)
  (GPT-2's Conv1D). Exact: x·W + b = x·(Wᵀ)ᵀ + b.
- fuse-rms-norm: ``w · (x · rsqrt(mean(x², -1) + ε))`` → ``rms_norm(x, w){eps=ε}``
  (optionally wrapped in casts to fp32 and back, as Llama writes it); with x = y − mean(y),
  a LayerNorm written out (Cohere's), → ``layer_norm(y, w, b)``.
- fold-norm-scale: ``rms_norm(x) · c`` with a constant vector c (Gemma's ``1 + w``, a
  constant only once folded) → ``rms_norm(x, c)``, so that norm passes see the norm's scale.
- fuse-attention: ``softmax(q·kᵀ · c + mask) · v`` → ``sdpa(q, k, v, mask){scale=c}``
  (``/ d`` gives scale = 1/d).
- fold-repeat-kv: ``sdpa(q, repeat_kv(k), repeat_kv(v))`` → ``sdpa(q, k, v){gqa}``: the query
  heads of a group read their shared key/value head instead of copies of it. Exact.
- fold-batchnorm: ``bn(conv(x, W, b))`` → ``conv(x, W', b')`` with, per output channel,
  k = γ / √(σ² + ε),  W' = k·W,  b' = k·(b − μ) + β. Same for ``linear`` followed by
  batch norm over its features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.ir.attrs import CallArgs
from lowbit.ir.graph import Graph, Node, Value
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.rewriter import Bindings, Rule, apply_rules, replace_with, single_user


def _call(node: Node) -> CallArgs:
    call = node.attrs.get("args")
    assert isinstance(call, CallArgs)
    return call


def _scalar_arg(node: Node, index: int) -> float | None:
    """A literal number at call position ``index`` of an opaque node."""
    args = _call(node).args
    value = args[index] if index < len(args) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _constant_scalar(value: Value | None, graph: Graph) -> float | None:
    if value is None or not graph.is_constant(value) or graph.tensor(value).numel() != 1:
        return None
    return float(graph.tensor(value).item())


# ---- addmm → linear ----------------------------------------------------------------------

def _match_addmm(node: Node, graph: Graph) -> Bindings | str:
    if node.op == "aten.addmm.default" and (len(_call(node).args) > 3 or _call(node).kwargs):
        return "addmm has beta/alpha arguments"
    weight = node.operands[-1]
    if not graph.is_constant(weight):
        return "the weight (second matrix) is not a constant"
    if node.op == "core.matmul" and (graph.tensor(weight).dim() != 2 or not graph.tensor(weight).is_floating_point()
                                     or node.operand(0).tensor_type.rank < 1):
        return "a matmul's constant is not a 2-D float matrix"
    return {"node": node, "weight": weight}


def _rewrite_addmm(b: Bindings, graph: Graph) -> None:
    node, weight = b["node"], b["weight"]
    assert isinstance(node, Node) and isinstance(weight, Value)
    w_t = graph.tensor(weight).t().contiguous()
    if len(weight.users) == 1:
        graph.set_tensor(weight, w_t)
        new_w = weight
    else:
        new_w = graph.constant(w_t, f"{weight.producer.attrs['name']}.T", weight.producer.loc.copy())
    x = node.operands[1] if node.op == "aten.addmm.default" else node.operands[0]
    bias = node.operands[0] if node.op == "aten.addmm.default" else None
    replace_with(graph, node, "core.linear", [x, new_w, bias], {}, "addmm-to-linear")
    graph.erase(node)


ADDMM_TO_LINEAR = Rule("addmm-to-linear", ("aten.addmm.default", "aten.mm.default", "core.matmul"),
                       _match_addmm, _rewrite_addmm)


# ---- RMSNorm -----------------------------------------------------------------------------

def _strip_cast(value: Value) -> Value:
    p = value.producer
    if p is not None and p.op in ("aten.to.dtype", "aten._to_copy.default") and p.operands:
        return p.operand(0)
    return value


def _match_rms_norm(rsqrt: Node, graph: Graph) -> Bindings | str:
    add = rsqrt.operand(0).producer
    if add is None or add.op != "aten.add.Tensor" or _scalar_arg(add, 1) is None:
        return "rsqrt's input is not `mean + eps` with a literal eps"
    mean = add.operand(0).producer
    if mean is None or mean.op != "aten.mean.dim":
        return "eps is not added to a mean"
    x32 = mean.operand(0).producer
    if x32 is None or x32.op != "aten.pow.Tensor_Scalar" or _scalar_arg(x32, 1) != 2.0:
        return "the mean is not over x²"
    x = x32.operand(0)
    rank = x.tensor_type.rank
    if not _mean_over_last(mean, rank):
        return "the mean is not over the last dim with keepdim"
    mul = single_user(rsqrt.result, graph)
    if mul is None or mul.op != "core.mul" or x not in mul.operands:
        return "rsqrt does not scale x itself (x · rsqrt(...))"
    normed, weight = mul.result, None
    cast_user = single_user(normed, graph)
    if cast_user is not None and _strip_cast(cast_user.result) is normed:
        normed = cast_user.result
    scale = single_user(normed, graph)
    if scale is not None and scale.op == "core.mul":
        other = [v for v in scale.operands if v is not normed]
        if len(other) == 1 and graph.is_constant(other[0]) and other[0].tensor_type.rank == 1:
            weight = other[0]
    source = _strip_cast(x)
    if normed is not mul.result and source.type != normed.type:
        return "the casts around the norm do not return to the input dtype"
    if normed is mul.result:
        source = x
    end = scale if weight is not None else normed.producer
    bindings = {"x": source, "weight": weight, "eps": _scalar_arg(add, 1), "end": end, "layer_norm": False}
    centered = _centered(source, rank)
    if centered is not None:  # (y − mean(y)) · rsqrt(mean((y − mean(y))²) + ε): a LayerNorm written out
        bindings.update(x=centered, bias=None, layer_norm=True)
        shift = single_user(end.result, graph) if weight is not None else None
        if shift is not None and shift.op == "core.add":
            other = [v for v in shift.operands if v is not end.result]
            if len(other) == 1 and graph.is_constant(other[0]) and other[0].tensor_type.rank == 1 \
                    and shift.result.type == end.result.type:
                bindings["bias"], bindings["end"] = other[0], shift
    return bindings


def _centered(x: Value, rank: int) -> Value | None:
    """y where ``x`` is y − mean(y) over the last dim (keepdim), else None."""
    sub = x.producer
    if sub is None or sub.op != "core.sub":
        return None
    y, mean = sub.operand(0), sub.operand(1).producer
    if mean is None or mean.op != "aten.mean.dim" or mean.operand(0) is not y or not _mean_over_last(mean, rank):
        return None
    return y


def _mean_over_last(mean: Node, rank: int) -> bool:
    """``mean`` (aten.mean.dim) is over the last dim only, with keepdim."""
    args = _call(mean).args
    return len(args) >= 3 and args[2] is True and args[1] in ((-1,), (rank - 1,))


def _rewrite_rms_norm(b: Bindings, graph: Graph) -> None:
    end = b["end"]
    assert isinstance(end, Node)
    if b.get("layer_norm"):
        width = int(b["x"].tensor_type.shape[-1])
        replace_with(graph, end, "core.layer_norm", [b["x"], b["weight"], b["bias"]],
                     {"normalized_shape": (width,), "eps": b["eps"]}, "fuse-rms-norm")
        return
    replace_with(graph, end, "core.rms_norm", [b["x"], b["weight"]], {"eps": b["eps"]}, "fuse-rms-norm")


FUSE_RMS_NORM = Rule("fuse-rms-norm", ("aten.rsqrt.default",), _match_rms_norm, _rewrite_rms_norm)


def _match_norm_scale(norm: Node, graph: Graph) -> Bindings | str:
    if norm.operands[1] is not None:
        return "the norm has its own weight"
    mul = single_user(norm.result, graph)
    if mul is None or mul.op != "core.mul":
        return "the norm's output is not read by one multiply"
    other = [v for v in mul.operands if v is not norm.result]
    width = norm.result.tensor_type.shape[-1]
    if len(other) != 1 or not graph.is_constant(other[0]) or tuple(other[0].tensor_type.shape) != (width,):
        return "the multiply's other operand is not a constant vector over the normalized axis"
    if mul.result.type != norm.result.type or other[0].tensor_type.dtype != norm.result.tensor_type.dtype:
        return "the multiply changes the dtype"
    return {"x": norm.operand(0), "weight": other[0], "eps": norm.attrs["eps"], "end": mul}


FOLD_NORM_SCALE = Rule("fold-norm-scale", ("core.rms_norm",), _match_norm_scale, _rewrite_rms_norm)


# ---- attention ---------------------------------------------------------------------------

def _transposed_last_two(value: Value) -> Value | None:
    """k if value = kᵀ over the last two dims."""
    p = value.producer
    if p is None or p.op != "aten.transpose.int":
        return None
    rank = p.operand(0).tensor_type.rank
    dims = {d % rank for d in _call(p).args[1:3] if isinstance(d, int)}
    return p.operand(0) if dims == {rank - 1, rank - 2} else None


def _score_scale(node: Node, graph: Graph) -> tuple[Value, float] | None:
    """(scores, c) if node computes scores · c (or scores / d, c = 1/d)."""
    if node.op in ("core.mul", "core.div"):
        c = _constant_scalar(node.operands[1], graph)
        if c is None:
            return None
        return node.operand(0), (c if node.op == "core.mul" else 1.0 / c)
    if node.op in ("aten.mul.Tensor", "aten.div.Tensor"):
        c = _scalar_arg(node, 1)
        if c is None:
            return None
        return node.operand(0), (c if node.op == "aten.mul.Tensor" else 1.0 / c)
    return None


def _match_attention(softmax: Node, graph: Graph) -> Bindings | str:
    rank = softmax.result.tensor_type.rank
    if softmax.attrs["dim"] not in (-1, rank - 1):
        return "softmax is not over the last dim"
    out = single_user(softmax.result, graph)
    if out is None or out.op != "core.matmul" or out.operands[0] is not softmax.result:
        return "the probabilities are not multiplied by values (p · v)"
    scores, mask, scale = softmax.operand(0), None, 1.0
    p = scores.producer
    if p is not None and p.op == "core.add" and single_user(scores, graph) is softmax:
        scores, mask = p.operand(0), p.operand(1)
        p = scores.producer
    if p is not None and single_user(scores, graph) is not None:
        scaled = _score_scale(p, graph)
        if scaled is not None:
            scores, scale = scaled
            p = scores.producer
    if p is None or p.op != "core.matmul":
        return "the scores are not q · kᵀ"
    k = _transposed_last_two(p.operand(1))
    if k is None:
        return "the scores' right operand is not a transposed key"
    return {"q": p.operand(0), "k": k, "v": out.operand(1), "mask": mask, "scale": scale, "end": out}


def _rewrite_attention(b: Bindings, graph: Graph) -> None:
    end = b["end"]
    assert isinstance(end, Node)
    attrs = {"scale": float(b["scale"]), "causal": False, "gqa": False}
    replace_with(graph, end, "core.sdpa", [b["q"], b["k"], b["v"], b["mask"]], attrs, "fuse-attention")


FUSE_ATTENTION = Rule("fuse-attention", ("core.softmax",), _match_attention, _rewrite_attention)


# ---- grouped-query attention -------------------------------------------------------------

_RESHAPES = ("aten._unsafe_view.default", "aten.view.default", "aten.reshape.default")


def _repeated_heads(value: Value) -> tuple[Value, int] | None:
    """(K, n) when ``value`` is K [b, h, L, d] with each head repeated n times in place
    (``reshape(expand(unsqueeze(K, 2)), [b, h·n, L, d])``, transformers' ``repeat_kv``)."""
    node = value.producer
    if node is None or node.op not in _RESHAPES:
        return None
    x = node.operands[0]
    if x.producer is not None and x.producer.op == "aten.clone.default":
        x = x.producer.operands[0]
    expand = x.producer
    unsqueeze = expand.operands[0].producer if expand is not None and expand.op == "aten.expand.default" else None
    if unsqueeze is None or unsqueeze.op != "aten.unsqueeze.default" or _call(unsqueeze).args[1] not in (2, -3):
        return None
    src, wide, out = unsqueeze.operands[0].tensor_type.shape, x.tensor_type.shape, value.tensor_type.shape
    n = wide[2]
    if len(src) != 4 or len(wide) != 5 or not isinstance(n, int) or not isinstance(src[1], int) \
            or wide[:2] != src[:2] or wide[3:] != src[2:] or out != (src[0], src[1] * n, *src[2:]):
        return None
    return unsqueeze.operands[0], n


def _match_repeat_kv(node: Node, graph: Graph) -> Bindings | str:
    if node.attrs.get("gqa"):
        return "already grouped"
    k, v = _repeated_heads(node.operand(1)), _repeated_heads(node.operand(2))
    if k is None or v is None:
        return "keys and values are not head-repeated copies"
    if k[1] != v[1]:
        return "keys and values are repeated differently"
    return {"sdpa": node, "k": k[0], "v": v[0]}


def _rewrite_repeat_kv(b: Bindings, graph: Graph) -> None:
    node = b["sdpa"]
    assert isinstance(node, Node)
    node.set_operand(1, b["k"])
    node.set_operand(2, b["v"])
    node.attrs["gqa"] = True
    node.touch("fold-repeat-kv")


FOLD_REPEAT_KV = Rule("fold-repeat-kv", ("core.sdpa",), _match_repeat_kv, _rewrite_repeat_kv)


# ---- batch norm folding ------------------------------------------------------------------

def _match_batchnorm(bn: Node, graph: Graph) -> Bindings | str:
    src = bn.operand(0)
    producer = src.producer
    if producer is None or producer.op not in ("core.conv2d", "core.linear"):
        return "batch norm does not follow a conv2d or linear"
    if single_user(src, graph) is not bn:
        return "the conv/linear output has other users"
    if producer.op == "core.linear" and src.tensor_type.rank != 2:
        return "batch norm after a linear folds only for [N, C] activations"
    params = [producer.operands[1], producer.operands[2], *bn.operands[1:]]
    if not all(v is None or graph.is_constant(v) for v in params):
        return "weights or statistics are not constants"
    if len(producer.operands[1].users) != 1:
        return "the weight is shared with another op"
    return {"bn": bn, "layer": producer}


def _rewrite_batchnorm(b: Bindings, graph: Graph) -> None:
    bn, layer = b["bn"], b["layer"]
    assert isinstance(bn, Node) and isinstance(layer, Node)
    get = lambda v: None if v is None else graph.tensor(v)  # noqa: E731
    gamma, beta, mean, var = (get(v) for v in bn.operands[1:])
    w = graph.tensor(layer.operand(1))
    k = torch.rsqrt(var + float(bn.attrs.get("eps", 1e-5)))
    if gamma is not None:
        k = k * gamma
    bias = get(layer.operands[2])
    bias = torch.zeros_like(mean) if bias is None else bias
    new_b = k * (bias - mean) + (beta if beta is not None else 0.0)
    graph.set_tensor(layer.operand(1), w * k.reshape(-1, *([1] * (w.dim() - 1))))
    if layer.operands[2] is not None and len(layer.operands[2].users) == 1:
        graph.set_tensor(layer.operand(2), new_b)
    else:
        name = f"{layer.operand(1).producer.attrs['name']}.folded_bias"
        layer.set_operand(2, graph.constant(new_b, name, layer.loc.copy()))
    layer.touch("fold-batchnorm")
    graph.replace_value(bn.result, layer.result)
    graph.erase(bn)


FOLD_BATCHNORM = Rule("fold-batchnorm", ("core.batch_norm",), _match_batchnorm, _rewrite_batchnorm)


# ---- passes ------------------------------------------------------------------------------

def _rule_pass(rule: Rule, summary: str) -> type[Pass]:
    @dataclass(frozen=True)
    class RulePass(Pass):
        def run(self, graph: Graph, ctx: PassContext) -> bool:
            return apply_rules(graph, [rule], self.name)

    RulePass.name = rule.name  # type: ignore[misc]
    RulePass.summary = summary  # type: ignore[misc]
    RulePass.__name__ = RulePass.__qualname__ = "".join(p.title() for p in rule.name.split("-"))
    return register(RulePass)


RULES = {r.name: r for r in (ADDMM_TO_LINEAR, FUSE_RMS_NORM, FOLD_NORM_SCALE, FUSE_ATTENTION, FOLD_REPEAT_KV, FOLD_BATCHNORM)}
AddmmToLinear = _rule_pass(ADDMM_TO_LINEAR, "addmm/mm with a constant [in, out] weight → linear")
FuseRmsNorm = _rule_pass(FUSE_RMS_NORM, "pow/mean/rsqrt/mul → rms_norm")
FoldNormScale = _rule_pass(FOLD_NORM_SCALE, "rms_norm without a weight, times a constant vector → rms_norm with it")
FuseAttention = _rule_pass(FUSE_ATTENTION, "matmul/softmax/matmul → sdpa")
FoldRepeatKv = _rule_pass(FOLD_REPEAT_KV, "attention on head-repeated keys/values → grouped-query sdpa (no copies)")
FoldBatchnorm = _rule_pass(FOLD_BATCHNORM, "fold inference batch norm into the conv/linear before it")

