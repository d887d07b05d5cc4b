"""``insert-qdq``: quantize linear weights offline and put quantize/dequantize pairs on
linear inputs (lossy; the pass manager reports the drift).

Weights (per output channel, axis 0; or per group of G inputs, axis 1):
    s = max|W| / qmax (symmetric) or (max − min) / (qmax − qmin) with a zero point,
    W_q = clamp(round(W / s) + z)  stored as an integer constant, then dequantize → linear.
Activations: static (one scale/zero point from calibration, chosen by the spec's observer)
or dynamic per token (``quant.dynamic_quantize`` computes them at run time). A dynamic spec
with the ``mse`` observer (``int4/token/dynamic/mse``) gets a clip ratio per quantizer: each
token's range is shrunk by the ratio on a grid (1 down to 0.5) whose rounding of up to
``clip_rows`` sampled calibration tokens gives the linears reading them the least output error
(QuaRot clips 4-bit activations at 0.9).

With ``auto_dynamic`` > 0 an activation quantized statically whose expected relative RMS
error on the calibration histogram exceeds that bound is quantized per token instead: static
where calibration shows it holds quality, dynamic only where a layer needs it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.ir.dialects.quant import dynamic_quantize
from lowbit.ir.graph import Graph, Location, Node, Value
from lowbit.ir.parser import clone_graph
from lowbit.passes.base import Pass, PassContext, register
from lowbit.passes.cleanup import remove_dead_nodes
from tqdm.auto import tqdm

from lowbit.quant.calibrate import RowSample, Sweep, block_of, calibrate
from lowbit.quant.checkpoint import Rounded, SweepCheckpoint, fingerprint
from lowbit.quant.experts import GROUPED_MM, expert_matmuls, expert_spec, gptq_experts, round_experts
from lowbit.quant.gptq import FloatTarget, gptq_quantize
from lowbit.quant.observers import EPS, TensorStats, scale_zero_point
from lowbit.quant.spec import QSpec, parse_qspec
from lowbit.quant.weights import apply_qparams, dequantize_codes, weight_qparams


def quantize_weight(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Round to nearest: (q, scale, zero_point or None, dequantize attrs) for a [out, in] weight."""
    scale, zp, attrs = weight_qparams(w, spec)
    return apply_qparams(w, scale, zp, spec, attrs), scale, zp, attrs


def static_rel_error(stats: TensorStats, spec: QSpec) -> float:
    """Expected relative RMS error of quantizing with the calibrated range (from the histogram)."""
    qmin, qmax = spec.qrange
    lo, hi = stats.range(spec.observer, qmax - qmin + 1, spec.symmetric)
    step = max(hi - lo, EPS) / (qmax - qmin)
    c, n = stats.bin_centers(), stats.hist
    clipped = c.clamp(lo, hi)
    err = (n * ((c - clipped) ** 2 + (step ** 2 / 12) * (c == clipped))).sum()
    return math.sqrt(err.item() / max((n * c ** 2).sum().item(), 1e-30))


_SHAPE_OPS = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.slice.Tensor",
              "aten.contiguous.default", "aten.clone.default", "aten._to_copy.default", "aten.squeeze.dim",
              "aten.unsqueeze.default", "aten.select.int")


CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # per-token clip ratios tried: 1 … 0.5


def search_clip(rows: torch.Tensor, spec: QSpec, readout: torch.Tensor | None = None) -> tuple[float, float]:
    """The clip ratio of CLIP_GRID whose per-token rounding of ``rows`` (tokens × features) as
    ``spec`` has the least squared error, measured after ``readout`` (features × k: what the
    consumers read, ``consumer_readout``) when given; (ratio, its error relative to the
    unclipped one's)."""
    errors = []
    for clip in CLIP_GRID:
        q, scale, zero = dynamic_quantize(rows, dtype=spec.dtype, symmetric=spec.symmetric, clip=clip)
        diff = (q.float() - zero.float()) * scale - rows
        errors.append((diff if readout is None else diff @ readout).pow(2).sum().item())
    best = min(range(len(errors)), key=errors.__getitem__)
    return CLIP_GRID[best], errors[best] / max(errors[0], 1e-30)


def consumer_readout(weights: list[torch.Tensor], width: int = 256) -> torch.Tensor:
    """Wᵀ of the consumers' stacked weights W [out, in], so that ‖E·Wᵀ‖ is their output error for
    an input error E; past ``width`` outputs a seeded Gaussian sketch Wᵀ·P/√width [in, width]
    (the same norm in expectation, at a fraction of the products)."""
    w = torch.cat([t.float() for t in weights])
    if w.shape[0] <= width:
        return w.T
    sketch = torch.randn(w.shape[0], width, generator=torch.Generator().manual_seed(0)) / math.sqrt(width)
    return w.T @ sketch


def computed_weight(graph: Graph, v: Value) -> torch.Tensor | None:
    """The weight a linear computes with: the constant, or the constant codes it dequantizes
    (weights rounded before its input's quantizer is calibrated); None when not constant."""
    if graph.is_constant(v):
        return graph.tensor(v)
    p = v.producer
    if p is None or p.op != "quant.dequantize" or not all(graph.is_constant(o) for o in p.operands if o is not None):
        return None
    zp = p.operands[2] if len(p.operands) > 2 else None
    return dequantize_codes(graph.tensor(p.operands[0]), graph.tensor(p.operands[1]),
                            None if zp is None else graph.tensor(zp), p.attrs)


def output_heads(graph: Graph) -> set[int]:
    """ids of the linears whose result is a graph output (through reshapes, slices, casts): a
    language model's lm_head, a classifier's last layer."""
    heads = set()
    for v in graph.outputs:
        p = v.producer
        while p is not None and p.op in _SHAPE_OPS:
            p = p.operand(0).producer
        if p is not None and p.op == "core.linear":
            heads.add(id(p))
    return heads


def _unquantized(v: Value) -> Value:
    """The value a linear's input QDQ reads (the input itself if it has none): GPTQ's Hessian is
    taken on the activations before their own rounding, as llm-compressor's is."""
    p = v.producer
    if p is not None and p.op == "quant.dequantize" and p.operand(0).producer is not None \
            and p.operand(0).producer.op in ("quant.quantize", "quant.dynamic_quantize"):
        return p.operand(0).producer.operand(0)
    return v


GRAM_ROWS = 4096      # _hessian gathers the batches' rows into products of up to this many tokens
GRAM_FLOATS = 1 << 25  # ... and of up to this many input floats


def _hessian(xs: Iterable[torch.Tensor], floats: Iterable[torch.Tensor] | None = None,
             outs: list[int] | None = None, weights: torch.Tensor | None = None
             ) -> tuple[torch.Tensor | None, list[FloatTarget] | None]:
    """GPTQ's H = Σ x̃ᵀx̃ over every row (real token) of every batch ``xs``, and with ``floats``
    (the float model's inputs at the same tokens) one ``FloatTarget`` for each layer reading the
    input (``outs``: their output counts): what moves its target to the float outputs. Given
    the layers' weights stacked [Σ outs, in], the target's sums are taken per layer (Rᵀ·X̃ and
    ‖R‖², R = (X − X̃)·Wᵀ: about tokens·in·out each; ``per_layer_sums`` says when that is
    cheaper); otherwise per input, shared by the layers (C = Σ xᵀx̃ and Σ (x − x̃)ᵀ(x − x̃):
    tokens·in² each, then in²·out per layer to apply). Rows are gathered over batches into
    products of up to ``GRAM_ROWS`` tokens, in float32, summed in float64; the sums are then
    held in float32, as GPTQ reads them. No real token at all: (None, None)."""
    h = cross = gap = pull = misfit = None
    tokens = 0
    for xq2, x2 in _row_chunks(xs, floats):
        h = _add(h, xq2.T @ xq2)
        if x2 is None:
            continue
        tokens += xq2.shape[0]
        if weights is None:
            cross = _add(cross, x2.T @ xq2)
            e = x2.sub_(xq2)
            gap = _add(gap, e.T @ e)
        else:
            r = x2.sub_(xq2) @ weights.T
            misfit = _add(misfit, torch.einsum("ij,ij->j", r, r))
            pull = _add(pull, r.T @ xq2)
    if floats is None or not tokens:
        return h, None
    if weights is None:
        return h, [FloatTarget(cross.float(), gap=gap.float(), tokens=tokens)] * len(outs)
    return h, [FloatTarget(pull=p.float(), misfit=float(m.sum()), tokens=tokens)
               for p, m in zip(pull.split(outs), misfit.split(outs), strict=True)]


def per_layer_sums(nodes: list[Node]) -> bool:
    """Whether the float target's sums for the linears ``nodes`` (reading one input) are cheaper
    per layer: when their outputs together are no more than the input's features (o_proj,
    down_proj), 2·tokens·in·Σout is below 2·tokens·in² + 2·in²·Σout for any token count."""
    width = nodes[0].operand(1).tensor_type.shape[1]
    return sum(n.operand(1).tensor_type.shape[0] for n in nodes) <= width


def _row_chunks(xs: Iterable[torch.Tensor], floats: Iterable[torch.Tensor] | None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The rows of the batches ``xs`` (and of ``floats`` beside them), float32 [rows, features],
    gathered into chunks of up to ``GRAM_ROWS`` rows and ``GRAM_FLOATS`` floats (a larger batch
    is one chunk): fewer, larger products and float64 sums, each product summed in float32 over
    no more tokens than one batch of a few thousand would be."""
    pairs = zip(xs, floats, strict=True) if floats is not None else ((x, None) for x in xs)
    rows = lambda t: t.detach().reshape(-1, t.shape[-1]).float()
    held: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    size = 0
    for xq, x in pairs:
        xq2 = rows(xq)
        if held and (size + xq2.shape[0] > GRAM_ROWS or (size + xq2.shape[0]) * xq2.shape[1] > GRAM_FLOATS):
            yield _gather(held)
            held, size = [], 0
        held.append((xq2, None if x is None else rows(x)))
        size += xq2.shape[0]
    if held:
        yield _gather(held)


def _gather(held: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if len(held) == 1:
        xq, x = held[0]
        return xq, None if x is None else x.clone()  # (the float rows are changed in place)
    xq = torch.cat([q for q, _ in held])
    return xq, None if held[0][1] is None else torch.cat([x for _, x in held])


def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part.double() if total is None else total.add_(part)


def _from_constants(v: Value) -> bool:
    """Whether ``v`` is computed from constants alone (no graph input reaches it): a weight
    sliced or reshaped out of a stored tensor, not an activation."""
    seen, todo = set(), [v]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if x.producer is None:
            return False  # a graph input
        todo.extend(x.producer.operands)
    return True


def _matches(loc: str, patterns: str) -> bool:
    return any(fnmatch.fnmatchcase(loc, p.strip()) for p in patterns.split(";") if p.strip())


@register
@dataclass(frozen=True)
class InsertQdq(Pass):
    name: ClassVar[str] = "insert-qdq"
    lossless: ClassVar[bool] = False
    idempotent: ClassVar[bool] = False
    summary: ClassVar[str] = "quantize linear and convolution weights and activations (QDQ)"
    weights: str = "int8/channel"
    acts: str = "none"
    kv: str = "none"         # the key and value inputs of attention
    weights_override: str = ""  # ';'-separated 'pattern>spec': another weight spec for matching layers
    skip: str = ""           # ';'-separated module-path patterns left in float
    dynamic: str = ""        # ';'-separated module-path patterns whose inputs are quantized per token
    auto_dynamic: float = 0.0
    dynamic_last: int = 0    # the linears of the last N repeated blocks read per-token activations
    dynamic_acts: str = "none"  # the spec of activations quantized per token (default: acts' dtype)
    rounding: str = "rtn"    # rtn | gptq
    damp: float = 0.01       # GPTQ: damping, as a fraction of mean(diag H)
    act_order: bool = False  # GPTQ: quantize columns by decreasing Hessian diagonal (static groups)
    sequential: bool = False  # GPTQ: block by block, each on the outputs of the quantized blocks before
    true_sequential: bool = False  # sequential GPTQ: layer by layer inside a block too
    rounded_inputs: bool = False  # sequential GPTQ: Hessians of the inputs after their own QDQ
    refit: bool = True       # GPTQ: once the codes are chosen, solve their scales for the least error
    float_target: float = 0.0  # sequential GPTQ: how far (0-1) each layer's target moves to the float model's outputs
    head: bool = False       # quantize the output head (a linear writing a graph output: lm_head)
    embeddings: str = "none"  # a weight spec for embedding tables (rows as output channels)
    clip_rows: int = 512     # dynamic acts with the mse observer: calibration tokens sampled per quantizer

    def __post_init__(self) -> None:
        parse_qspec(self.weights, f"{self.name}.weights")
        for key in ("acts", "kv", "dynamic_acts"):
            if getattr(self, key) != "none":
                parse_qspec(getattr(self, key), f"{self.name}.{key}")
        for pattern, spec in self._overrides():
            parse_qspec(spec, f"{self.name}.weights_override[{pattern}]")
        if self.embeddings != "none" and parse_qspec(self.embeddings, f"{self.name}.embeddings").granularity \
                not in ("channel", "group", "tensor"):
            raise ValueError(f"{self.name}.embeddings: rows take channel, group or tensor scales")
        if self.dynamic_last < 0:
            raise ValueError(f"{self.name}.dynamic_last: {self.dynamic_last} is not a count of blocks (0 or more)")
        if self.rounding not in ("rtn", "gptq"):
            raise ValueError(f"{self.name}.rounding: {self.rounding!r} is not one of rtn, gptq")
        if not 0.0 <= self.float_target <= 1.0:
            raise ValueError(f"{self.name}.float_target: {self.float_target} is not a fraction from 0 to 1")
        if self.float_target and not (self.rounding == "gptq" and self.sequential):
            raise ValueError(f"{self.name}.float_target needs rounding: gptq with sequential: true (without "
                             "sequential, GPTQ already reads the float model's inputs)")

    def _targets(self, graph: Graph, ctx: PassContext) -> list[Node]:
        linears = [n for n in graph.nodes if n.op == "core.linear" and graph.is_constant(n.operands[1])
                   and not _matches(n.loc.module, self.skip)]
        computed = [n.loc.module or n.results[0].name for n in graph.nodes if n.op == "core.linear"
                    and not graph.is_constant(n.operands[1]) and not _matches(n.loc.module, self.skip)
                    and _from_constants(n.operands[1])]
        if computed:
            ctx.note(f"{self.name}: {len(computed)} linear(s) read a weight the graph computes from constants "
                     f"({', '.join(dict.fromkeys(computed[:4]))}{', ...' if len(computed) > 4 else ''}): they stay "
                     "float (only a constant weight is quantized)")
        heads = output_heads(graph)
        if heads and not self.head:
            kept = [n.loc.module or n.results[0].name for n in linears if id(n) in heads]
            if kept:
                ctx.note(f"{self.name}: the output head ({', '.join(kept)}) stays float (head=true quantizes it)")
            linears = [n for n in linears if id(n) not in heads]
        return linears

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        linears = self._targets(graph, ctx)
        convs = [n for n in graph.nodes if n.op == "core.conv2d" and graph.is_constant(n.operands[1])
                 and not _matches(n.loc.module, self.skip)]
        experts = [n for n in expert_matmuls(graph) if not _matches(n.loc.module, self.skip)]
        sequential = self.rounding == "gptq" and self.sequential
        wspec = parse_qspec(self.weights, f"{self.name}.weights")
        # the float model, run beside the quantized one for float_target (its tensors shared, not copied)
        reference = clone_graph(graph, share_tensors=True) if self.float_target else None
        if self.rounding == "gptq" and not sequential:  # Hessians of the float model's activations
            self._quantize_gptq(graph, ctx, linears, wspec, experts=experts)
        if self.acts != "none":
            acts = parse_qspec(self.acts, f"{self.name}.acts")
            static_only = self._conv_inputs(ctx, convs, acts)  # calibrated in the same pass as the linears'
            last = self._last_blocks(ctx, linears)
            self._quantize_activations(graph, ctx, [(n, 0) for n in linears + experts + static_only], acts,
                                       lambda m: _matches(m, self.dynamic) or block_of(m) in last,
                                       {id(n) for n in static_only})
        if self.kv != "none":
            attention = [n for n in graph.nodes if n.op == "core.sdpa" and not _matches(n.loc.module, self.skip)]
            self._quantize_activations(graph, ctx, [(n, i) for n in attention for i in (1, 2)],
                                       parse_qspec(self.kv, f"{self.name}.kv"), lambda m: False)
        if sequential:  # Hessians of the activations after the blocks (and layers) before are quantized
            self._quantize_gptq(graph, ctx, linears, wspec, reference, experts)
        elif self.rounding == "rtn":
            for node in linears:
                self._quantize_weight(graph, node, self._layer_spec(node, wspec, graph), None)
            for node in experts:
                spec = self._expert_spec(node, wspec)
                self._set_weight(graph, node, spec, round_experts(graph.tensor(node.operand(1)), spec))
        if experts:
            self._note_experts(ctx, experts, wspec)
        self._quantize_conv_weights(graph, ctx, convs, wspec)
        if self.embeddings != "none":
            self._quantize_embeddings(graph, ctx, parse_qspec(self.embeddings, f"{self.name}.embeddings"))
        remove_dead_nodes(graph)  # the float weights
        return bool(linears or convs or experts)

    def _quantize_conv_weights(self, graph: Graph, ctx: PassContext, convs: list[Node], wspec: QSpec) -> None:
        """Convolution weights [out, in/groups, kh, kw]: one scale per output channel (a group
        spec too: groups run along a linear's in features), round to nearest."""
        for node in convs:
            spec = self._layer_spec(node, wspec)
            if spec.granularity == "group":
                spec = QSpec(spec.dtype, "channel", None, spec.symmetric)
            self._quantize_weight(graph, node, spec, None)
        if convs and (wspec.granularity == "group" or self.rounding == "gptq"):
            ctx.note(f"{self.name}: {len(convs)} convolution(s) quantized per output channel by rounding "
                     "to nearest (groups and GPTQ apply to linear layers)")

    def _conv_inputs(self, ctx: PassContext, convs: list[Node], spec: QSpec) -> list[Node]:
        """The convolutions whose input gets one calibrated scale (and zero point): all of them,
        unless the spec is per token or dynamic (made for linears' [tokens, features] inputs);
        then they read float, and a note says so."""
        if convs and (spec.dynamic or spec.granularity != "tensor"):
            ctx.note(f"{self.name}: the inputs of {len(convs)} convolution(s) stay float: activation spec "
                     f"{self.acts} is per token or dynamic (convolutions take one static scale)")
            return []
        return convs

    def _overrides(self) -> list[tuple[str, str]]:
        out = []
        for item in filter(None, (p.strip() for p in self.weights_override.split(";"))):
            if ">" not in item:
                raise ValueError(f"{self.name}.weights_override: {item!r} is not 'pattern>spec'")
            pattern, spec = item.split(">", 1)
            out.append((pattern.strip(), spec.strip()))
        return out

    def _layer_spec(self, node: Node, spec: QSpec, graph: Graph | None = None) -> QSpec:
        """The spec for one layer: an override's if its pattern matches. Groups that do not
        divide the in features keep their size; the last one is short. A group as wide as the
        in features or wider is one scale per output channel, and stored as such."""
        for pattern, text in self._overrides():
            if _matches(node.loc.module, pattern):
                spec = parse_qspec(text, f"{self.name}.weights_override[{pattern}]")
                break
        in_features = math.prod(node.operand(1).tensor_type.shape[1:])
        if graph is not None and spec.granularity == "group" and spec.group_size >= in_features:
            return QSpec(spec.dtype, "channel", None, spec.symmetric, observer=spec.observer)
        return spec

    def _expert_spec(self, node: Node, spec: QSpec) -> QSpec:
        """The spec for an MoE layer's experts (an override's if its pattern matches)."""
        return expert_spec(self._layer_spec(node, spec), node.operand(1).tensor_type.shape[1])

    def _note_experts(self, ctx: PassContext, experts: list[Node], wspec: QSpec) -> None:
        how = "by GPTQ on the rows routed to each expert" if self.rounding == "gptq" else "to nearest"
        shapes = sorted({tuple(n.operand(1).tensor_type.shape) for n in experts})
        ctx.note(f"{self.name}: {len(experts)} MoE expert weight tensor(s) ({', '.join('×'.join(map(str, s)) for s in shapes)}"
                 f" [experts, in, out]) quantized per expert as {self.weights}, {how}"
                 + (f"; their inputs as {self.acts}" if self.acts != "none" else ""))

    def _quantize_gptq(self, graph: Graph, ctx: PassContext, linears: list[Node], wspec: QSpec,
                       reference: Graph | None = None, experts: list[Node] = ()) -> None:
        """GPTQ in one sweep of the calibration set through the graph (``Sweep``: all batches
        together, block by block, each block's weights read once). The sweep stops after each
        linear input is computed; that input's Hessian H = Σ xᵀx rounds the linears reading it.

        With ``sequential`` each block is calibrated on the outputs of the blocks before it,
        already quantized: once a block's layers are rounded, the sweep goes back to the
        block's start and runs it again on its rounded weights. With ``true_sequential`` too,
        the rounded weights are used at once, so later layers in the same block are calibrated
        on them as well (measured worse on the shipped models: byte-llama ``w4a16-gptq``
        4.9908 against 4.9860 block by block). The Hessian is taken on the input before its
        own QDQ, or after it with ``rounded_inputs``. Without ``sequential`` the sweep runs the
        float weights: the Hessians of the float model. Only the Hessians of the layers being
        rounded are ever held.

        With a ``reference`` (the graph as the pass found it: ``float_target``) a second sweep
        runs the float model alongside, and each layer's target moves toward the float model's
        outputs (``FloatTarget``): the error the quantized blocks before left in
        the layer's input is then compensated, not only measured.

        With a work folder (``ctx.work_dir``) the state is saved after each block, and a run
        of the same graph, pass and calibration set resumes from it (``SweepCheckpoint``).

        MoE ``experts`` (grouped matmuls) are rounded in the same sweep, each expert by GPTQ on
        the rows routed to it (``gptq_experts``), toward their own weights (no float target)."""
        source = (lambda v: v) if self.rounded_inputs and self.sequential else _unquantized
        batches = ctx.require_calibration(f"{self.name}{{rounding=gptq}}")
        ckpt = SweepCheckpoint(ctx.work_dir, fingerprint(graph, str(self), batches)) if ctx.work_dir else None
        state = ckpt.load() if ckpt else None
        sweep = Sweep(graph, batches)
        ex = sweep.executor
        floats = Sweep(reference, batches) if reference is not None else None
        float_values = {} if reference is None else \
            {v.name: v for v in [*reference.inputs, *(r for n in reference.nodes for r in n.results)]}
        groups: dict[int, tuple[Value, list[Node]]] = {}
        for node in linears:
            x = source(node.operand(0))
            groups.setdefault(id(x), (x, []))[1].append(node)
        for node in experts:  # each its own entry: its Hessians are per expert
            groups[id(node)] = (source(node.operand(0)), [node])
        after = lambda x: 0 if x.producer is None else ex.step_index(x.producer) + 1
        ready = lambda x, nodes: max([after(x), *(after(n.operand(2)) for n in nodes if n.op in GROUPED_MM)])
        order = sorted(groups.values(), key=lambda g: ready(*g))
        blocks = list(dict.fromkeys(block_of(g[1][0].loc.module) for g in order))
        done, fresh = self._resume(graph, ctx, ckpt, state, sweep, [*linears, *experts], wspec, len(blocks))
        bar = tqdm(total=len(blocks), initial=done, desc=f"{self.name} gptq", unit="block",
                   disable=not ctx.progress, leave=False)
        pinned: list[Node] = []
        waiting: list[tuple[Node, torch.Tensor]] = []  # rounded in this block; used once it is done
        marked, current = None, None
        moved: list[tuple[float, int, str]] = []  # float_target: (fraction applied, tokens, layer)
        starved = [0, 0]  # MoE experts that saw fewer calibration rows than their inputs, of all
        with torch.no_grad(), bar:
            for x, nodes in order:
                block = blocks.index(block_of(nodes[0].loc.module))
                if block < done:
                    continue
                if block != current and waiting:  # the block before runs again, on its rounded weights
                    sweep.rewind(marked)
                    for node, w in waiting:
                        ex.pin(node, 1, w), pinned.append(node)
                    waiting, marked = [], None
                sweep.advance(ready(x, nodes))
                for node in [n for n in pinned if ex.step_index(n) < sweep.pos]:  # run: not needed again
                    ex.pin(node, 1, None), pinned.remove(node)
                if block != current:
                    current = block
                    if self.sequential and not self.true_sequential:
                        marked = sweep.mark()
                if block > bar.n:  # a block begins: the ones before it are finished
                    bar.update(block - bar.n)
                    if ckpt and not pinned and ckpt.save(block, sweep.pos, fresh, sweep.envs, set(ex.const_names)):
                        fresh = {}
                if nodes[0].op in GROUPED_MM:
                    node = nodes[0]
                    spec = self._expert_spec(node, wspec)
                    rounded, seen = gptq_experts(graph.tensor(node.operand(1)), spec,
                                                 lambda: zip(sweep.values(x), sweep.values(node.operand(2))),
                                                 damp=self.damp, act_order=self.act_order, refit=self.refit)
                    starved[0] += int((seen < node.operand(1).tensor_type.shape[1]).sum())
                    starved[1] += seen.numel()
                    self._rounded(graph, node, spec, rounded, fresh if ckpt else None, waiting, pinned, ex)
                    continue
                fx = None
                if floats is not None:  # the same input in the float model (it is named as before the pass)
                    fx = float_values[_unquantized(x).name]
                    floats.advance(0 if fx.producer is None else floats.executor.step_index(fx.producer) + 1)
                outs = [n.operand(1).tensor_type.shape[0] for n in nodes]
                weights = None
                if fx is not None and per_layer_sums(nodes):  # (the graph's own tensor for one float32 layer)
                    weights = torch.cat([self._flat_weight(graph, n) for n in nodes]) if len(nodes) > 1 \
                        else self._flat_weight(graph, nodes[0])
                h, targets = _hessian(sweep.tokens(x), None if fx is None else floats.tokens(fx), outs, weights)
                del weights
                for node, target in zip(nodes, targets or [None] * len(nodes), strict=True):
                    if target is not None:
                        target.toward = self.float_target
                    spec = self._layer_spec(node, wspec, graph)
                    rounded = self._round_weight(graph, node, spec, h, target=target)
                    if target is not None:
                        moved.append((target.moved, target.tokens, node.loc.module or node.results[0].name))
                    self._rounded(graph, node, spec, rounded, fresh if ckpt else None, waiting, pinned, ex)
                bar.set_postfix_str(nodes[0].loc.module or x.name, refresh=False)
            bar.update(len(blocks) - bar.n)
        if ckpt:
            ckpt.clear()
        self._note_moved(ctx, moved)
        if starved[0]:
            ctx.note(f"{self.name}: {starved[0]} of {starved[1]} MoE experts' GPTQ saw fewer calibration rows than "
                     "their inputs; their Hessians lean on the layer's pooled statistics (more calibration tokens "
                     "reach more experts)")

    def _rounded(self, graph: Graph, node: Node, spec: QSpec, rounded: Rounded, fresh: dict | None,
                 waiting: list[tuple[Node, torch.Tensor]], pinned: list[Node], ex) -> None:
        """A layer rounded by the GPTQ sweep: its weight replaced, kept for the work folder's
        checkpoint (``fresh``), and, when sequential, its rounded weight run by the sweep from
        then on (at once with ``true_sequential``, else once its block is done: ``waiting``)."""
        self._set_weight(graph, node, spec, rounded)
        if fresh is not None:
            fresh[node.results[0].name] = rounded
        if self.sequential:
            w = dequantize_codes(rounded.q, rounded.scale, rounded.zp, rounded.attrs).to(
                node.operand(1).tensor_type.dtype.storage)
            if self.true_sequential:
                ex.pin(node, 1, w), pinned.append(node)
            else:
                waiting.append((node, w))

    def _note_moved(self, ctx: PassContext, moved: list[tuple[float, int, str]]) -> None:
        """Say where float_target moved a layer's target less than asked, and why."""
        short = sorted(m for m in moved if m[0] < 0.9 * self.float_target)
        if not short:
            return
        fraction, tokens, layer = short[0]
        ctx.note(f"{self.name}: float_target={self.float_target:g} moved {len(short)} of {len(moved)} layers less "
                 f"far (median {short[len(short) // 2][0]:.2f}, least {fraction:.2f} at {layer} on {tokens} tokens): "
                 f"the move is fitted on the calibration tokens and is shrunk by how much of it is noise; "
                 f"more calibration tokens let it act in full")

    def _resume(self, graph, ctx, ckpt, state, sweep, linears, wspec, blocks) -> tuple[int, dict]:
        """Apply a saved state: the layers it rounded, the sweep's position and values; returns
        the blocks done and the (empty) results since the last save."""
        if ckpt and ckpt.note:
            ctx.note(f"{self.name}: {ckpt.note}")
        if state is None:
            return 0, {}
        done, step, results, envs = state
        for node in linears:
            rounded = results.get(node.results[0].name)
            if rounded is not None:
                self._set_weight(graph, node, self._layer_spec(node, wspec, graph), rounded)
        sweep.restore(step, envs)
        ctx.note(f"{self.name}: resumed from {ckpt.folder} after {done} of {blocks} blocks ({len(results)} layers rounded)")
        return done, {}

    def _quantize_embeddings(self, graph: Graph, ctx: PassContext, spec: QSpec) -> None:
        """Embedding tables [vocab, dim] stored quantized, one scale per row (or row and group),
        dequantized where they are read."""
        tables = [n for n in graph.nodes if n.op == "core.embedding" and graph.is_constant(n.operands[0])
                  and not _matches(n.loc.module, self.skip)]
        for node in tables:
            self._quantize_weight(graph, node, spec, None, index=0)
        if not tables:
            ctx.note(f"{self.name}: embeddings={self.embeddings} but the graph has no constant embedding table")

    def _quantize_weight(self, graph: Graph, node: Node, spec: QSpec, hessian: torch.Tensor | None,
                         index: int = 1) -> None:
        """Replace the node's weight operand by its codes, dequantized."""
        self._set_weight(graph, node, spec, self._round_weight(graph, node, spec, hessian, index), index)

    def _round_weight(self, graph: Graph, node: Node, spec: QSpec, hessian: torch.Tensor | None,
                      index: int = 1, target: FloatTarget | None = None) -> Rounded:
        flat = self._flat_weight(graph, node, index)
        if hessian is not None:
            q, scale, zp, attrs = gptq_quantize(flat, hessian, spec, self.damp, self.act_order, refit=self.refit,
                                                target=target)
        else:
            q, scale, zp, attrs = quantize_weight(flat, spec)
        return Rounded(q.reshape(node.operand(index).tensor_type.shape), scale, zp, attrs)

    @staticmethod
    def _flat_weight(graph: Graph, node: Node, index: int = 1) -> torch.Tensor:
        """The weight as float32 rows: a convolution's [out, in, kh, kw] as [out, in·kh·kw]."""
        full = graph.tensor(node.operand(index)).float()
        return full.reshape(full.shape[0], -1)

    def _set_weight(self, graph: Graph, node: Node, spec: QSpec, rounded: Rounded, index: int = 1) -> None:
        w = node.operand(index)
        name = str(w.producer.attrs["name"])
        loc = Location(node.loc.module)
        qv = graph.constant(rounded.q, f"{name}.q", loc, dtype=spec.dtype)
        sv = graph.constant(rounded.scale, f"{name}.scale", loc)
        zv = graph.constant(rounded.zp, f"{name}.zero_point", loc, dtype=spec.dtype) if rounded.zp is not None else None
        dq = graph.append("quant.dequantize", [qv, sv, zv], {**rounded.attrs, "out_dtype": w.tensor_type.dtype},
                          loc=loc, before=node, name=f"{node.results[0].name}_w")
        dq.touch(self.name)
        node.set_operand(index, dq.result)
        node.touch(self.name)

    def _last_blocks(self, ctx: PassContext, linears: list[Node]) -> set[str]:
        """The last ``dynamic_last`` repeated blocks (a path with a
        numeric part: ``encoder.layer.5``) holding the listed linears, in graph order.

        Why the last ones: a float difference of one ulp (another runtime's summation order)
        can flip a static int8 code, and each flip moves codes in the quantizers after it,
        about threefold per quantizer on MiniLM. By the last blocks two runtimes' rounding no
        longer agrees, so the noise those blocks add reaches the output differently in each;
        per-token steps there are finer and that disagreement smaller. The first block always
        stays static: the option makes a static model's tail finer, not a model per token
        throughout (that is ``w8a8-dynamic``)."""
        if not self.dynamic_last:
            return set()
        blocks = [b for b in dict.fromkeys(block_of(n.loc.module) for n in linears if n.loc.module)
                  if b.rsplit(".", 1)[-1].isdigit()]  # block_of gives a path without a number whole
        if len(blocks) < 2:
            ctx.note(f"{self.name}: dynamic_last={self.dynamic_last} found {len(blocks)} repeated block(s) (module "
                     "paths with a numeric part) and keeps the first static; activations keep the static/"
                     "auto_dynamic choice")
            return set()
        count = min(self.dynamic_last, len(blocks) - 1)
        last = blocks[-count:]
        capped = f"; the first of {len(blocks)} blocks stays static" if count < self.dynamic_last else ""
        ctx.note(f"{self.name}: the linears of the last {count} blocks ({', '.join(last)}) read per-token "
                 f"activations (dynamic_last{capped})")
        return set(last)

    def _quantize_activations(self, graph: Graph, ctx: PassContext, uses: list[tuple[Node, int]],
                              spec: QSpec, force_dynamic: Callable[[str], bool],
                              static_only: set[int] = frozenset()) -> None:
        """QDQ on operand ``index`` of each listed node; one pair per distinct value. A value read
        by a node in ``static_only`` (by id: a convolution) keeps one calibrated scale; one read by
        a node whose module path ``force_dynamic`` accepts is quantized per token."""
        groups: dict[int, tuple[Value, list[tuple[Node, int]]]] = {}
        for node, index in uses:
            x = node.operand(index)
            groups.setdefault(id(x), (x, []))[1].append((node, index))
        fixed = {vid for vid, (_, users) in groups.items() if any(id(u) in static_only for u, _ in users)}
        static = [x for vid, (x, users) in groups.items() if vid in fixed or (
            not spec.dynamic and not any(force_dynamic(u.loc.module) for u, _ in users))]
        stats = calibrate(graph, ctx.require_calibration(self.name), static,
                          progress=ctx.progress, desc=self.name) if static else {}
        dyn = parse_qspec(self.dynamic_acts, f"{self.name}.dynamic_acts") if self.dynamic_acts != "none" else spec
        dynamic = []
        for vid, (x, users) in groups.items():
            st = stats.get(x.name)
            if st is None or (vid not in fixed and self.auto_dynamic > 0
                              and static_rel_error(st, spec) > self.auto_dynamic):
                dynamic.append((x, users))
                continue
            dq = self._insert_static(graph, x, users[0][0], spec, st)
            for u, index in users:
                u.set_operand(index, dq)
        clips = self._search_clips(graph, ctx, dynamic, dyn)
        for x, users in dynamic:
            dq = self._insert_dynamic(graph, x, users[0][0], dyn, clips.get(x.name, 1.0))
            for u, index in users:
                u.set_operand(index, dq)

    def _search_clips(self, graph: Graph, ctx: PassContext, dynamic: list[tuple[Value, list[tuple[Node, int]]]],
                      spec: QSpec) -> dict[str, float]:
        """Per-token clip ratios (``search_clip``) of the dynamic quantizers on the listed values
        (with their users), when their spec asks for the ``mse`` observer: by the error of the
        linears that read the value where all its users are linears, else of the value itself. A
        note gives the spread."""
        if spec.observer != "mse" or not dynamic:
            return {}
        samples = calibrate(graph, ctx.require_calibration(self.name), [x for x, _ in dynamic],
                            progress=ctx.progress, desc=f"{self.name} clip",
                            observer=lambda: RowSample(self.clip_rows))
        clips, gains, tokens = {}, [], 0
        for x, users in dynamic:
            sample = samples[x.name]
            if not sample.rows:
                continue
            rows = sample.tensor()
            weights = [computed_weight(graph, u.operands[1]) if u.op == "core.linear" and i == 0 else None
                       for u, i in users]
            readout = consumer_readout(weights) if all(w is not None for w in weights) else None
            clips[x.name], gain = search_clip(rows, spec, readout)
            gains.append(gain)
            tokens = max(tokens, rows.shape[0])
        if clips:
            ratios = sorted(clips.values())
            ctx.note(f"{self.name}: per-token activation ranges clipped by MSE on {tokens} sampled calibration "
                     f"tokens: ratio {ratios[0]:.3f}–{ratios[-1]:.3f} (median {ratios[len(ratios) // 2]:.3f}) over "
                     f"{len(ratios)} quantizers, rounding error {min(gains):.2f}–{max(gains):.2f}× the unclipped")
        return clips

    def _insert_static(self, graph: Graph, x: Value, first: Node, spec: QSpec, st: TensorStats) -> Value:
        qmin, qmax = spec.qrange
        lo, hi = st.range(spec.observer, int(qmax - qmin) + 1, spec.symmetric)
        scale, zp = scale_zero_point(lo, hi, qmin, qmax, spec.symmetric)
        loc = Location(first.loc.module)
        sv = graph.constant(torch.tensor(scale), f"{x.name}.act_scale", loc)
        zv = None if spec.symmetric else graph.constant(
            torch.tensor(zp, dtype=spec.dtype.storage), f"{x.name}.act_zero_point", loc, dtype=spec.dtype)
        q = graph.append("quant.quantize", [x, sv, zv], {"dtype": spec.dtype}, loc=loc, before=first)
        dq = graph.append("quant.dequantize", [q.result, sv, zv], {"out_dtype": x.tensor_type.dtype},
                          loc=loc, before=first)
        q.touch(self.name), dq.touch(self.name)
        return dq.result

    def _insert_dynamic(self, graph: Graph, x: Value, first: Node, spec: QSpec, clip: float = 1.0) -> Value:
        loc = Location(first.loc.module)
        attrs = {"dtype": spec.dtype, "symmetric": spec.symmetric, **({"clip": clip} if clip != 1.0 else {})}
        q = graph.append("quant.dynamic_quantize", [x], attrs, loc=loc, before=first)
        q_val, scale, zp = q.results
        dq = graph.append("quant.dequantize", [q_val, scale, None if spec.symmetric else zp],
                          {"out_dtype": x.tensor_type.dtype}, loc=loc, before=first)
        q.touch(self.name), dq.touch(self.name)
        return dq.result
