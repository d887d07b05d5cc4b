"""Scale folding: ``smooth-quant`` and the region discovery it rests on.

For a value X read only by linears (as their input), with per-channel scales s:
    X' = X · diag(s)⁻¹,   W' = W · diag(s)   for every consumer (columns of W [out, in])
and diag(s)⁻¹ is absorbed by X's producer:
    LayerNorm / RMSNorm:  γ' = γ / s,  β' = β / s
    a linear through attention heads (v_proj → sdpa → o_proj): rows of W_v and b_v divided by s,
    since attention mixes tokens, never channels, the per-channel scale passes through;
    a gated MLP's up projection (x = silu(gate) ⊙ up → down): rows of W_up divided by s; of a
    fused gate/up projection split in two (Phi-3's gate_up_proj), the up piece's rows only.
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

MoE layers (``experts``, on by default): the experts read rows of the norm's output that the
router gathers for them, so one scale per channel folds into the norm, the router and every
expert's rows of W [experts, in, out] alike (or every expert's linear, where each reads its
piece of the routed rows split per expert, as JetMoE's do). After a gated expert MLP's up
projection each expert gets its own scale s_e: its slice of up-projection columns divided by
s_e, the rows of its down projection multiplied by it, with statistics (and, for ``alpha:
auto``, the search) from the calibration rows routed to that expert. An expert no calibration
row reached keeps s_e = 1. Experts whose input nothing can absorb a scale into (an activation clamp, a bias
added after the up projection) are named in a note, as are the linears no region reaches.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.ir.graph import Graph, Node, Value
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.rewriter import single_user
from lowbit.quant.calibrate import RowSample, calibrate
from lowbit.quant.experts import GROUPED_MM, expert_matmuls, is_expert_matmul, watch, watch_routed, watched, where
from lowbit.quant.observers import TensorStats
from lowbit.quant.spec import parse_qspec
from lowbit.quant.weights import fake_quantize

_HEAD_RESHAPES = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
                  "aten.transpose.int", "aten.clone.default")


@dataclass
class Region:
    x: Value
    producer: Node
    consumers: list[Node]  # linears, or MoE grouped matmuls (``GROUPED_MM``) reading x's channels
    explicit: bool = False  # 1/s as a multiply before ``consumers``, not folded into ``producer``
    routed: bool = False  # one MoE layer's experts, each its own scale: s is [experts, channels]
    offset: int = 0  # where x's channels start in the producer's outputs (a fused gate/up projection)


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
    if p is None or not _absorbing_norm(p, graph):
        return None
    return p if single_user(x, graph) is not None or all(u.op == "core.linear" for u in x.users) else None


def _absorbing_norm(p: Node, graph: Graph) -> bool:
    """A LayerNorm/RMSNorm whose scale (and shift) only it reads, so they can absorb 1/s."""
    if p.op not in ("core.layer_norm", "core.rms_norm") or not _own_constant(p.operands[1], graph):
        return False
    return p.op == "core.rms_norm" or p.operands[2] is None or _own_constant(p.operands[2], graph)


def _gated_producer(x: Value, graph: Graph) -> tuple[Node, int] | None:
    """The up projection u in x = a ⊙ u (Llama's MLP: silu(gate) ⊙ up): x / s = a ⊙ (u / s);
    u may be a piece of a fused gate/up projection's output split along its last dim (Phi-3's
    ``gate_up_proj``), the returned offset saying where its rows start."""
    p = x.producer
    if p is None or p.op != "core.mul":
        return None
    for v in p.operands:
        if v is None or v.type != x.type or single_user(v, graph) is not p:
            continue
        offset = _split_offset(v)
        if offset is not None and single_user(v.producer.operand(0), graph) is v.producer:
            v = v.producer.operand(0)
        q = v.producer
        if q is not None and q.op == "core.linear" and _own_constant(q.operands[1], graph):
            return q, offset or 0
    return None


def _reads_once(u: Node, v: Value) -> bool:
    """``u`` reads ``v`` as its first operand and nowhere else."""
    return bool(u.operands) and u.operands[0] is v and not any(o is v for o in u.operands[1:])


def _weight_reader(u: Node, v: Value, graph: Graph) -> bool:
    """``u`` reads ``v`` as the input of a linear or of MoE experts whose weight only it reads."""
    if not _reads_once(u, v) or len(u.operands) < 2 or not _own_constant(u.operands[1], graph):
        return False
    return u.op == "core.linear" or is_expert_matmul(graph, u)


def _row_gather(u: Node, v: Value) -> bool:
    """``u`` picks whole rows of ``v`` (MoE routing: ``x[token_index]``), channels untouched."""
    if u.op not in ("aten.index.Tensor", "aten.index_select.default") or not _reads_once(u, v) \
            or v.tensor_type.rank < 2:
        return False
    args = u.attrs["args"].args  # type: ignore[union-attr]
    if u.op == "aten.index.Tensor":
        return isinstance(args[1], (tuple, list)) and len(args[1]) == 1 and args[1][0] is not None
    return u.op == "aten.index_select.default" and args[1] == 0


def _keeps_last_dim(u: Node, v: Value) -> bool:
    """A reshape whose last dim is ``v``'s: every row of the result is a row of ``v``."""
    return (u.op in ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
            and _reads_once(u, v) and u.result.tensor_type.shape[-1] == v.tensor_type.shape[-1])


def _channel_readers(x: Value, graph: Graph) -> tuple[list[Node], bool] | None:
    """The linears and MoE experts that read x's channels, through reshapes and row gathers
    and splits, and whether any reads routed rows (through a gather or a split); None if
    anything else reads them (or they leave the graph)."""
    outputs = {id(v) for v in graph.outputs}
    readers, todo, routed = [], [x], False
    while todo:
        v = todo.pop()
        if id(v) in outputs:
            return None
        for u in dict.fromkeys(v.users):
            if _weight_reader(u, v, graph):
                readers.append(u)
            elif _keeps_last_dim(u, v):
                todo.append(u.result)
            elif _row_gather(u, v) or _row_split(u, v):
                todo.extend(u.results)
                routed = True
            else:
                return None
    return readers, routed


def _row_split(u: Node, v: Value) -> bool:
    """``u`` splits ``v``'s rows into pieces (JetMoE: the routed rows, one piece per expert)."""
    if u.op not in ("aten.split.Tensor", "aten.split_with_sizes.default") or not _reads_once(u, v):
        return False
    args = u.attrs["args"].args  # type: ignore[union-attr]
    rank = v.tensor_type.rank
    return rank >= 2 and (args[2] if len(args) > 2 else 0) % rank != rank - 1


def _split_offset(v: Value) -> int | None:
    """Where piece ``v`` of a split along the last dim starts (None: not such a piece)."""
    p = v.producer
    if p is None or p.op not in ("aten.split.Tensor", "aten.split_with_sizes.default"):
        return None
    args = p.attrs["args"].args  # type: ignore[union-attr]
    rank = p.operand(0).tensor_type.rank
    if len(args) < 3 or args[2] % rank != rank - 1:
        return None
    i = next(k for k, r in enumerate(p.results) if r is v)
    return i * args[1] if p.op == "aten.split.Tensor" else sum(args[1][:i])


def _expert_regions(graph: Graph) -> list[Region]:
    """MoE layers' scale-folding regions:

    - a norm whose output reaches experts through the routing's row gathers (and any router
      or shared-expert linears beside them): one scale per channel for all its readers;
    - a gated expert MLP, x = a ⊙ u with u a slice of the experts' up projection: each expert's
      up columns divided by its own scale, the rows of its down projection multiplied by it."""
    regions = []
    for node in graph.nodes:
        if _absorbing_norm(node, graph):
            found = _channel_readers(node.result, graph)
            if found and found[0] and (found[1] or any(u.op in GROUPED_MM for u in found[0])):
                regions.append(Region(node.result, node, found[0]))
    for down in expert_matmuls(graph):
        x, mul = down.operand(0), down.operand(0).producer
        if mul is None or mul.op != "core.mul" or single_user(x, graph) is not down:
            continue
        for v in mul.operands:
            offset = _split_offset(v) if v is not None and v.type == x.type else None
            up = v.producer.operand(0).producer if offset is not None else None
            if (up is not None and single_user(v, graph) is mul and is_expert_matmul(graph, up)
                    and _own_constant(up.operands[1], graph) and up.operands[2] is down.operands[2]
                    and _own_constant(down.operands[1], graph)):
                regions.append(Region(x, up, [down], routed=True, offset=offset))
                break
    return regions


def find_regions(graph: Graph, explicit: bool = False, experts: bool = False) -> list[Region]:
    """Values whose linear readers can be smoothed. With ``explicit``, also a norm's output read
    by linears and by something else (the residual add of a post-norm model); with ``experts``,
    MoE layers' regions too (``_expert_regions``)."""
    regions = _expert_regions(graph) if experts else []
    taken = {id(r.x) for r in regions}
    outputs = {id(v) for v in graph.outputs}
    for node in graph.nodes:
        for x in node.results:
            users = x.users
            if not users or id(x) in taken:
                continue
            linears = [u for u in users
                       if u.op == "core.linear" and u.operands[0] is x and _own_constant(u.operands[1], graph)]
            if len(linears) == len(users) and id(x) not in outputs:
                producer = _flattened_norm(x, graph) or _attention_producer(x, graph)
                producer, offset = (producer, 0) if producer is not None else _gated_producer(x, graph) or (None, 0)
                if producer is not None:
                    regions.append(Region(x, producer, users, offset=offset))
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
    experts: bool = True      # smooth MoE experts' inputs too (each expert its own scale after its up projection)

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
        regions = find_regions(graph, self.explicit, experts=self.experts)
        note_unscaled(graph, regions, ctx, self.name, self.experts)
        if not regions:
            return False
        search = self.alpha == "auto"
        xs, routed = sample_inputs(graph, ctx.require_calibration(self.name), [r.x for r in regions if not r.routed],
                                   [u for r in regions for u in r.consumers if u.op in GROUPED_MM],
                                   (lambda: _StatsAndSample(self.rows)) if search else TensorStats,
                                   4 * self.rows if search else 0, ctx, self.name)
        chosen, tokens = [], 0
        for r in regions:
            if r.routed:
                down = r.consumers[0]
                rows = routed[id(down)]
                w = expert_matrices(graph, down) if search else None
                w_absmax = input_absmax(graph, down, per_expert=True)
                s = torch.ones_like(w_absmax)
                for e in range(s.shape[0]):
                    sample = rows.rows(e)
                    if rows.absmax is None or not rows.absmax[e].any():
                        continue  # no calibration row reached the expert: no statistics to smooth by
                    alpha = (self._search(sample, [w[e]], rows.absmax[e], w_absmax[e]) if search and sample.shape[0]
                             else 0.5 if search else float(self.alpha))
                    if search:
                        chosen.append(alpha)
                    s[e] = smoothing_scales(rows.absmax[e], w_absmax[e], alpha)
                apply_scales(graph, r, equal_ranges(s, rows.absmax), self.name)
                continue
            st = xs[r.x.name]
            x_absmax = st.stats.channel_absmax if search else st.channel_absmax
            w_absmax = torch.stack([input_absmax(graph, u) for u in r.consumers]).amax(0)
            if search:
                sample = st.sample.tensor()
                weights = [graph.tensor(u.operand(1)).float() for u in r.consumers if u.op not in GROUPED_MM]
                alpha = self._search(sample, weights, x_absmax, w_absmax, expert_terms(graph, r, routed))
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
            ctx.note(f"{self.name}: α chosen per region (and MoE expert) by quantized output error on {tokens} "
                     f"sampled calibration tokens ({self.weights} weights, {self.acts} activations): "
                     + ", ".join(f"{a:g} ×{n}" for a, n in counts.items()))
        return True

    def _search(self, x: torch.Tensor, weights: list[torch.Tensor], x_absmax: torch.Tensor,
                w_absmax: torch.Tensor, extra: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> float:
        """The α on the grid whose smoothing leaves the least error ‖Q(X/s)·Q(W·s)ᵀ − X·Wᵀ‖² in
        the region's consumers, with weights and activations rounded as specified; ``extra``
        are (rows, weight) pairs read on their own rows (MoE experts on the rows routed to them)."""
        wspec, aspec = parse_qspec(self.weights), parse_qspec(self.acts)
        if aspec.granularity == "token":  # the sample's rows are tokens: one range per row
            aspec = dataclasses.replace(aspec, granularity="channel", dynamic=False)
        terms = [(x, w) for w in weights] + list(extra)
        ref = [xt @ w.T for xt, w in terms]
        best, best_err = 0.5, float("inf")
        for i in range(self.grid + 1):
            alpha = i / self.grid
            s = smoothing_scales(x_absmax, w_absmax, alpha)
            err = sum((fake_quantize(xt / s, aspec) @ fake_quantize(w * s, wspec).T - y).pow(2).sum().item()
                      for (xt, w), y in zip(terms, ref))
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


def sample_inputs(graph: Graph, batches, values: list[Value], experts: list[Node], observer,
                  routed_rows: int, ctx: PassContext, desc: str) -> tuple[dict, dict]:
    """One calibration sweep: an ``observer()`` on each of ``values`` (by name), and the rows
    routed to each expert of the grouped matmuls ``experts`` (``RoutedRows`` by node id, with a
    sample of ``routed_rows`` rows)."""
    observers: dict = {}
    xs = {}
    for v in values:
        if v.name not in xs:
            xs[v.name] = observer()
            watch(observers, v, xs[v.name].update)
    routed = {id(u): watch_routed(observers, u, routed_rows) for u in experts}
    calibrate(graph, batches, watched(observers), progress=ctx.progress, desc=desc, observers=observers)
    return xs, routed


def expert_terms(graph: Graph, r: Region, routed: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, weight [out, in]) for each expert among a shared region's consumers that
    calibration routed sampled rows to."""
    terms = []
    for u in r.consumers:
        if u.op in GROUPED_MM:
            w = expert_matrices(graph, u)
            terms += [(rows, w[e]) for e in range(w.shape[0]) if (rows := routed[id(u)].rows(e)).shape[0]]
    return terms


def expert_matrices(graph: Graph, node: Node) -> torch.Tensor:
    """MoE experts' weights [experts, in, out] as float [experts, out, in], each expert's matrix
    contiguous as a linear's weight (what the searches quantize, once per grid point)."""
    return graph.tensor(node.operand(1)).float().transpose(1, 2).contiguous()


def note_unscaled(graph: Graph, regions: list[Region], ctx: PassContext, name: str, asked: bool) -> None:
    """Notes naming the layers no region scales: MoE experts (not ``asked`` to, or their input
    comes from something that cannot absorb a scale) and linears other than the output head."""
    from lowbit.passes.quantize import output_heads

    scaled = {id(u) for r in regions for u in r.consumers}
    left = [n for n in expert_matmuls(graph) if id(n) not in scaled]
    if left:
        why = ("their input is not a norm's output or a gated up projection's, which could absorb them" if asked
               else "experts=false")
        ctx.note(f"{name}: {len(left)} MoE expert weight tensor(s) ({where(left)}) get no scales ({why})")
    heads = output_heads(graph)
    linears = [n for n in graph.nodes if n.op == "core.linear" and id(n) not in scaled and id(n) not in heads
               and graph.is_constant(n.operands[1])]
    if linears:
        kinds = Counter(re.sub(r"\.\d+(?=\.|$)", ".*", n.loc.module or n.result.name) for n in linears)
        ctx.note(f"{name}: {len(linears)} linear layer(s) are not scaled ("
                 + ", ".join(f"{k} ×{c}" for k, c in kinds.most_common()) + "): their input is not the output of a "
                 "norm, a linear or a gated up projection that could absorb the scales (rounded as they are)")


def equal_ranges(s: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Per-expert scales s [experts, channels] times one constant per expert, so that every
    expert calibration reached has the same max |x/s|: all experts' inputs share one activation
    quantizer, which an expert of larger range would otherwise claim for itself. (A constant
    per expert changes nothing for the weights, which have a scale per output channel.)"""
    reached = absmax.amax(1) > 0
    if not reached.any():
        return s
    peak = (absmax / s).amax(1)
    out = s.clone()
    out[reached] *= (peak[reached] / absmax.amax())[:, None]
    return out


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_·j|^(1−α), kept within [1e-4, 1e4]."""
    s = x_absmax.clamp_min(1e-5) ** alpha / w_absmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp(1e-4, 1e4)


def _scale_inputs(graph: Graph, node: Node, s: torch.Tensor) -> None:
    """Multiply the weight's input channels by s: a linear's columns ([out, in]), the rows of
    every expert's [in, out] matrix (s [in] for all experts, or [experts, in] each its own)."""
    w = node.operand(1)
    t = graph.tensor(w)
    s = s.to(t.dtype)
    graph.set_tensor(w, t * s[..., None] if node.op in GROUPED_MM else t * s)


def input_absmax(graph: Graph, node: Node, per_expert: bool = False) -> torch.Tensor:
    """max |W| per input channel of a linear or of MoE experts (over all experts, or each
    expert's own: [experts, in])."""
    t = graph.tensor(node.operand(1)).abs().float()
    if node.op not in GROUPED_MM:
        return t.amax(0)
    return t.amax(2) if per_expert else t.amax((0, 2))


def apply_scales(graph: Graph, r: Region, s: torch.Tensor, pass_name: str) -> None:
    """X → X·diag(s)⁻¹ absorbed by the producer (or, for an explicit region, computed by a
    multiply the consumers read), W → W·diag(s) for every consumer."""
    for u in r.consumers:
        _scale_inputs(graph, u, s)
        u.touch(pass_name)
    p = r.producer
    if r.routed:  # each expert's slice of up-projection columns
        w = p.operand(1)
        t = graph.tensor(w)
        divisor = torch.ones(t.shape[0], 1, t.shape[2], dtype=t.dtype)
        divisor[:, 0, r.offset:r.offset + s.shape[1]] = s
        graph.set_tensor(w, t / divisor)
        p.touch(pass_name)
        return
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
    else:  # a linear producer: its output rows (x's slice of them)
        w = p.operand(1)
        divisor = torch.ones(w.tensor_type.shape[0], dtype=s.dtype)
        divisor[r.offset:r.offset + s.shape[0]] = s
        graph.set_tensor(w, graph.tensor(w) / divisor[:, None])
        if p.operands[2] is not None:
            graph.set_tensor(p.operand(2), graph.tensor(p.operand(2)) / divisor)
    p.touch(pass_name)
