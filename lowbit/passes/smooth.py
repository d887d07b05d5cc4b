"""Scale folding: ``smooth-quant`` and the region discovery it rests on.

For a value X read only by linears (as their input), with per-channel scales s:
    X' = X · diag(s)⁻¹,   W' = W · diag(s)   for every consumer (columns of W [out, in])
and diag(s)⁻¹ is absorbed by X's producer:
    LayerNorm / RMSNorm:  γ' = γ / s,  β' = β / s
    a linear through attention heads (v_proj → sdpa → o_proj): rows of W_v and b_v divided by s,
    since attention mixes tokens, never channels, the per-channel scale passes through;
    a gated MLP's up projection (x = silu(gate) ⊙ up → down): rows of W_up divided by s.
SmoothQuant picks  s_j = max|X_j|^α / max|W_·j|^(1−α)  from calibration statistics; with
``alpha: auto`` each region takes the α on a grid whose smoothed, quantized consumers best
reproduce their float outputs on a sample of calibration tokens (quantized as ``weights`` and
``acts`` say, which should match the ``insert-qdq`` that follows).

Regions come from the graph: a value qualifies if every consumer is a linear reading it as
input and the producer can absorb the inverse scale. A post-norm model's norm output (BERT,
MiniLM) also feeds the residual add, so no constant can absorb 1/s there; with ``explicit``
(the default) its linears read X·diag(s)⁻¹ from one per-channel multiply inserted for them,
an elementwise pass at run time, while the residual keeps X. The pass is lossless; the pass
manager checks it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.ir.graph import Graph, Node, Value
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.rewriter import single_user
from lowbit.quant.calibrate import RowSample, calibrate
from lowbit.quant.experts import expert_matmuls, where
from lowbit.quant.observers import TensorStats
from lowbit.quant.spec import parse_qspec
from lowbit.quant.weights import fake_quantize

_HEAD_RESHAPES = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
                  "aten.transpose.int", "aten.clone.default")


@dataclass
class Region:
    x: Value
    producer: Node
    consumers: list[Node]
    explicit: bool = False  # 1/s as a multiply before ``consumers``, not folded into ``producer``


def _keeps_channels(node: Node) -> bool:
    """A reshape/transpose that splits or merges heads but never moves the last dim's data."""
    if node.op != "aten.transpose.int":
        return node.op in _HEAD_RESHAPES
    rank = node.operand(0).tensor_type.rank
    dims = [d % rank for d in node.attrs["args"].args[1:3]]  # type: ignore[union-attr]
    return rank - 1 not in dims


def _through_heads(value: Value, graph: Graph) -> Value | None:
    """Walk back from ``value`` through head reshapes; the value they start from, if each
    step has a single user."""
    while value.producer is not None and _keeps_channels(value.producer):
        if single_user(value, graph) is None:
            return None
        value = value.producer.operand(0)
    return value


def _attention_producer(x: Value, graph: Graph) -> Node | None:
    out = _through_heads(x, graph)
    sdpa = out.producer if out is not None else None
    if sdpa is None or sdpa.op != "core.sdpa" or single_user(out, graph) is None:
        return None
    v = _through_heads(sdpa.operand(2), graph)
    if v is None or v.producer is None or v.producer.op != "core.linear":
        return None
    if single_user(v, graph) is None or not _own_constant(v.producer.operands[1], graph):
        return None
    if v.tensor_type.shape[-1] != x.tensor_type.shape[-1]:
        return None  # grouped-query attention repeats value heads: channels do not map 1:1
    return v.producer


def _own_constant(v: Value | None, graph: Graph) -> bool:
    """A constant used by one node only, so rescaling it changes nothing else."""
    return v is not None and graph.is_constant(v) and len(v.users) == 1


def _flattened_norm(x: Value, graph: Graph) -> Node | None:
    """The norm producing x, possibly through views that keep the last dim (GPT-2 flattens
    tokens to 2-D before its projections)."""
    while x.producer is not None and x.producer.op in ("aten.view.default", "aten._unsafe_view.default",
                                                       "aten.reshape.default"):
        src = x.producer.operand(0)
        if src.tensor_type.shape[-1] != x.tensor_type.shape[-1] or single_user(src, graph) is None:
            return None
        x = src
    p = x.producer
    if p is None or p.op not in ("core.layer_norm", "core.rms_norm") or not _own_constant(p.operands[1], graph):
        return None
    if p.op == "core.layer_norm" and p.operands[2] is not None and not _own_constant(p.operands[2], graph):
        return None
    return p if single_user(x, graph) is not None or all(u.op == "core.linear" for u in x.users) else None


def _gated_producer(x: Value, graph: Graph) -> Node | None:
    """The up projection u in x = a ⊙ u (Llama's MLP: silu(gate) ⊙ up): x / s = a ⊙ (u / s)."""
    p = x.producer
    if p is None or p.op != "core.mul":
        return None
    for v in p.operands:
        q = v.producer if v is not None else None
        if (q is not None and q.op == "core.linear" and single_user(v, graph) is p
                and _own_constant(q.operands[1], graph) and v.type == x.type):
            return q
    return None


def find_regions(graph: Graph, explicit: bool = False) -> list[Region]:
    """Values whose linear readers can be smoothed. With ``explicit``, also a norm's output read
    by linears and by something else (the residual add of a post-norm model)."""
    regions = []
    outputs = {id(v) for v in graph.outputs}
    for node in graph.nodes:
        for x in node.results:
            users = x.users
            if not users:
                continue
            linears = [u for u in users
                       if u.op == "core.linear" and u.operands[0] is x and _own_constant(u.operands[1], graph)]
            if len(linears) == len(users) and id(x) not in outputs:
                producer = (_flattened_norm(x, graph) or _attention_producer(x, graph)
                            or _gated_producer(x, graph))
                if producer is not None:
                    regions.append(Region(x, producer, users))
                    continue
            if explicit and linears and node.op in ("core.layer_norm", "core.rms_norm") \
                    and isinstance(x.tensor_type.shape[-1], int):
                regions.append(Region(x, node, linears, explicit=True))
    return regions


@register
@dataclass(frozen=True)
class SmoothQuant(Pass):
    name: ClassVar[str] = "smooth-quant"
    idempotent: ClassVar[bool] = False  # a second run rescales by the new statistics
    summary: ClassVar[str] = "move activation outliers into weights: X·diag(s)⁻¹, diag(s)·W"
    alpha: float | str = 0.5  # or "auto": per region, the grid α with the least quantized output error
    grid: int = 10            # alpha=auto: α ∈ {0, 1/grid, ..., 1}
    weights: str = "int8/channel"  # alpha=auto: the weight and activation quantization the search
    acts: str = "uint8/tensor/asym"  # rounds with (as the insert-qdq that follows)
    rows: int = 512           # alpha=auto: calibration tokens sampled per region
    explicit: bool = True     # a norm output that also feeds the residual: 1/s as a multiply

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise ValueError(f"{self.name}.alpha: {self.alpha!r} is neither a number in [0, 1] nor auto")
        elif not 0 <= self.alpha <= 1:
            raise ValueError(f"{self.name}.alpha: {self.alpha} is not in [0, 1]")
        if self.grid < 1:
            raise ValueError(f"{self.name}.grid: {self.grid} must be at least 1")
        parse_qspec(self.weights, f"{self.name}.weights")
        parse_qspec(self.acts, f"{self.name}.acts")

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        regions = find_regions(graph, self.explicit)
        experts = expert_matmuls(graph)
        if experts:
            ctx.note(f"{self.name}: {len(experts)} MoE expert weight tensor(s) ({where(experts)}) "
                     "are not smoothed (they read a routed copy of their input)")
        if not regions:
            return False
        search = self.alpha == "auto"
        stats = calibrate(graph, ctx.require_calibration(self.name), [r.x for r in regions],
                          progress=ctx.progress, desc=self.name,
                          observer=(lambda: _StatsAndSample(self.rows)) if search else TensorStats)
        chosen = []
        for r in regions:
            st = stats[r.x.name]
            x_absmax = st.stats.channel_absmax if search else st.channel_absmax
            w_absmax = torch.stack([graph.tensor(u.operand(1)).abs().amax(0) for u in r.consumers]).amax(0).float()
            if search:
                sample = st.sample.tensor()
                weights = [graph.tensor(u.operand(1)).float() for u in r.consumers]
                alpha = self._search(sample, weights, x_absmax, w_absmax)
                chosen.append(alpha)
                tokens = sample.shape[0]
            else:
                alpha = float(self.alpha)
            apply_scales(graph, r, smoothing_scales(x_absmax, w_absmax, alpha), self.name)
        explicit = sum(r.explicit for r in regions)
        if explicit:
            ctx.note(f"{self.name}: {explicit} of {len(regions)} smoothed values also feed something other than "
                     "linears (a post-norm residual); their linears read them through one per-channel multiply")
        if chosen:
            counts = {a: chosen.count(a) for a in sorted(set(chosen))}
            ctx.note(f"{self.name}: α chosen per region by quantized output error on {tokens} sampled "
                     f"calibration tokens ({self.weights} weights, {self.acts} activations): "
                     + ", ".join(f"{a:g} ×{n}" for a, n in counts.items()))
        return True

    def _search(self, x: torch.Tensor, weights: list[torch.Tensor], x_absmax: torch.Tensor,
                w_absmax: torch.Tensor) -> float:
        """The α on the grid whose smoothing leaves the least error ‖Q(X/s)·Q(W·s)ᵀ − X·Wᵀ‖² in
        the region's consumers, with weights and activations rounded as specified."""
        wspec, aspec = parse_qspec(self.weights), parse_qspec(self.acts)
        if aspec.granularity == "token":  # the sample's rows are tokens: one range per row
            aspec = dataclasses.replace(aspec, granularity="channel", dynamic=False)
        ref = [x @ w.T for w in weights]
        best, best_err = 0.5, float("inf")
        for i in range(self.grid + 1):
            alpha = i / self.grid
            s = smoothing_scales(x_absmax, w_absmax, alpha)
            xq = fake_quantize(x / s, aspec)
            err = sum((xq @ fake_quantize(w * s, wspec).T - y).pow(2).sum().item() for w, y in zip(weights, ref))
            if err < best_err:
                best, best_err = alpha, err
        return best


class _StatsAndSample:
    """One calibration sweep for α search: channel statistics and a token sample together."""

    def __init__(self, rows: int) -> None:
        self.stats, self.sample = TensorStats(), RowSample(rows)

    def update(self, x: torch.Tensor) -> None:
        self.stats.update(x)
        self.sample.update(x)


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_·j|^(1−α), kept within [1e-4, 1e4]."""
    s = x_absmax.clamp_min(1e-5) ** alpha / w_absmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp(1e-4, 1e4)


def apply_scales(graph: Graph, r: Region, s: torch.Tensor, pass_name: str) -> None:
    """X → X·diag(s)⁻¹ absorbed by the producer (or, for an explicit region, computed by a
    multiply the consumers read), W → W·diag(s) for every consumer."""
    for u in r.consumers:
        w = u.operand(1)
        graph.set_tensor(w, graph.tensor(w) * s.to(graph.tensor(w).dtype))
        u.touch(pass_name)
    p = r.producer
    if r.explicit:
        inverse = graph.constant((1 / s).to(r.x.tensor_type.dtype.storage), f"{pass_name}_inverse_scale")
        mul = graph.create_node("core.mul", [r.x, inverse], loc=p.loc.copy())
        graph.insert(mul, after=p)
        mul.touch(pass_name)
        for u in r.consumers:
            u.set_operand(0, mul.result)
        return
    if p.op in ("core.layer_norm", "core.rms_norm"):
        for v in p.operands[1:]:
            if v is not None:
                graph.set_tensor(v, graph.tensor(v) / s)
    else:  # a linear producer: its output rows
        w = p.operand(1)
        graph.set_tensor(w, graph.tensor(w) / s[:, None])
        if p.operands[2] is not None:
            graph.set_tensor(p.operand(2), graph.tensor(p.operand(2)) / s)
    p.touch(pass_name)
