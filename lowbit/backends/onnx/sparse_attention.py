"""Block-sparse attention as ONNX Runtime's ``com.microsoft.SparseAttention``.

``attn.block_sparse_sdpa`` exports as dense attention with the block mask expanded to tokens
everywhere (the default). With ``sparse_attention="contrib"`` the nodes that fit the contrib op
become ``SparseAttention`` instead: causal, no other token mask, queries and keys of one length
(a prompt), head dim a multiple of 8, block 16/32/64/128. The mask builder stays in the graph,
so the layout is still chosen from each input; it reaches the op as CSR per head:

    rows[h] = [0, cumsum(kept blocks per query-block row)]      (heads, blocks + 1)
    cols[h] = kept key-block indices, row-major, padded with −1 (heads, blocks²)

The op's layout has no batch axis, so a batch of several sequences attends within the union of
their layouts (a superset of what the pass chose for each; identical for one sequence).

The op keeps its key/value cache in buffers that its ``past_*`` input and ``present_*`` output
must share, so each such node gets graph inputs ``past_key.N``/``past_value.N`` and outputs
``present_key.N``/``present_value.N`` of shape (batch, kv heads, sequence, head dim), listed in
the model's metadata under ``lowbit.kv_cache``; ``present_*`` holds the prompt's keys and values
afterwards. :func:`run` binds fresh zero buffers to both sides. ONNX Runtime's CUDA kernel further needs fp16/bf16, head
dim 128 and block 64 (sm 7.5–9.0); its CPU kernel runs fp32 and fp16 with any block.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import torch

from lowbit.ir.graph import Node

CONTRIB_BLOCKS = (16, 32, 64, 128)
METADATA_KEY = "lowbit.kv_cache"
LOWERINGS = ("dense", "contrib")


def misfit(node: Node) -> str | None:
    """Why ``node`` (an ``attn.block_sparse_sdpa``) cannot be SparseAttention, or None."""
    q, k = node.operand(0).tensor_type, node.operand(1).tensor_type
    if not node.attrs.get("causal"):
        return "not causal (the op only attends causally; run sparse-attention{causal=true} on a decoder)"
    if node.operands[4] is not None:
        return "has a token mask besides causality"
    if q.rank != 4 or not all(isinstance(d, int) for d in (q.shape[1], q.shape[3], k.shape[1])):
        return f"needs [batch, heads, seq, dim] with static heads and head dim, got {q}"
    if q.shape[2] != k.shape[2]:
        return "queries and keys differ in length (the op attends a prompt over itself)"
    if q.shape[3] % 8 or node.operand(2).tensor_type.shape[3] != q.shape[3]:
        return f"head dim {q.shape[3]} is not a multiple of 8 (or values differ from it)"
    if node.attrs.get("block", 64) not in CONTRIB_BLOCKS:
        return f"block {node.attrs.get('block', 64)} is not one of {CONTRIB_BLOCKS}"
    return None


def cuda_misfit(node: Node) -> str | None:
    """Why ONNX Runtime's CUDA kernel would refuse a fitting node (its CPU kernel runs it)."""
    from lowbit.ir.types import DType

    q = node.operand(0).tensor_type
    if q.dtype not in (DType.f16, DType.bf16):
        return f"its CUDA kernel needs float16 or bfloat16, this model is {q.dtype.name} (export with --dtype float16)"
    if q.shape[3] != 128 or node.attrs.get("block", 64) != 64:
        return f"its CUDA kernel needs head dim 128 and block 64, this model has {q.shape[3]} and {node.attrs.get('block', 64)}"
    return None


def block_csr(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch union of ``block_mask`` [batch, heads, nq, nk] as CSR rows and −1-padded
    columns (int32). Built with cumsum and scatter so that it traces to fixed-shape ONNX."""
    layout = block_mask.any(0)
    heads, nq, nk = layout.shape
    counts = layout.sum(-1, dtype=torch.int32)
    rows = torch.cat([counts.new_zeros(heads, 1), counts.cumsum(-1, dtype=torch.int32)], 1)
    flat = layout.reshape(heads, nq * nk)
    slot = torch.where(flat, flat.cumsum(-1) - 1, nq * nk)  # dropped blocks go to a spare slot
    col = torch.arange(nk, dtype=torch.int32, device=flat.device).expand(heads, nq, nk).reshape(heads, nq * nk)
    cols = torch.full((heads, nq * nk + 1), -1, dtype=torch.int32, device=flat.device)
    return rows, cols.scatter(1, slot, col)[:, :-1]


def csr_layout(rows: torch.Tensor, cols: torch.Tensor, nk: int) -> torch.Tensor:
    """CSR back to a dense [heads, nq, nk] layout (the reference's view of the op's input)."""
    heads, nq = rows.shape[0], rows.shape[1] - 1
    slot = torch.arange(cols.shape[1], device=rows.device).expand(heads, -1).contiguous()
    row = torch.searchsorted(rows[:, 1:].contiguous(), slot, right=True)  # the row each slot is in
    used = slot < rows[:, -1:]
    head = torch.arange(heads, device=rows.device)[:, None].expand_as(slot)
    layout = torch.zeros(heads, nq, nk, dtype=torch.bool, device=rows.device)
    layout[head[used], row[used], cols[used].long()] = True
    return layout


# ---- the torch custom op that stands for it while exporting --------------------------------

@torch.library.custom_op("lowbit::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Causal attention on [batch, heads, seq, dim] within the CSR layout (same for the batch)."""
    from lowbit.ir.dialects.attn import block_sparse_sdpa

    layout = csr_layout(rows, cols, math.ceil(q.shape[2] / block)).expand(q.shape[0], -1, -1, -1)
    return block_sparse_sdpa(q, k, v, layout, None, block=block, causal=True, scale=scale)


@sparse_attention.register_fake
def _(q, k, v, rows, cols, block, scale):
    return torch.empty_like(q)


def onnx_sparse_attention(q, k, v, rows, cols, block: int, scale: float):
    """[batch, heads, seq, dim] ↔ the op's [batch, seq, heads·dim]. The cache buffers here are
    placeholders (zeros of the prompt's size) that :func:`add_cache_io` turns into graph I/O."""
    from onnxscript.values import Opset

    from lowbit.backends.onnx import ops

    op = ops.op  # the opset the export targets
    ops.declare_contrib_op(
        "SparseAttention",
        [("query", "T", False), ("key", "T", True), ("value", "T", True), ("past_key", "T", False),
         ("past_value", "T", False), ("block_row_indices", "M", False), ("block_col_indices", "M", False),
         ("total_sequence_length", "M", False), ("key_total_sequence_lengths", "M", False),
         ("cos_cache", "T", True), ("sin_cache", "T", True)],
        ["output", "present_key", "present_value"],
        [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]), ("M", ["tensor(int32)"])],
        [("num_heads", "INT", True), ("kv_num_heads", "INT", True), ("sparse_block_size", "INT", True),
         ("do_rotary", "INT", False), ("rotary_interleaved", "INT", False), ("scale", "FLOAT", False)])
    msft = Opset("com.microsoft", 1)
    heads, kv_heads = q.shape[1], k.shape[1]
    seq = op.Shape(q, start=2, end=3)
    cache = op.CastLike(op.ConstantOfShape(op.Shape(k)), q)
    total = op.Cast(op.Squeeze(seq), to=onnx.TensorProto.INT32)
    lengths = op.Expand(op.Cast(seq, to=onnx.TensorProto.INT32), op.Shape(q, end=1))
    out, _, _ = msft.SparseAttention(ops.to_bsd(q), ops.to_bsd(k), ops.to_bsd(v), cache, cache, rows, cols,
                                     total, lengths, num_heads=heads, kv_num_heads=kv_heads,
                                     sparse_block_size=block, scale=scale, _num_outputs=3)
    return ops.from_bsd(out, heads)


TRANSLATIONS = {torch.ops.lowbit.sparse_attention.default: onnx_sparse_attention}


def lowering(node: Node):
    """The export function for a fitting ``attn.block_sparse_sdpa``: CSR from its block mask,
    then the custom op."""
    block = int(node.attrs.get("block", 64))
    d = node.operand(0).tensor_type.shape[3]
    scale = float(node.attrs["scale"]) if node.attrs.get("scale") is not None else 1.0 / math.sqrt(d)

    def attention(q, k, v, block_mask, mask):
        rows, cols = block_csr(block_mask)
        return sparse_attention(q, k, v, rows, cols, block, scale)

    return attention, {}


# ---- the cache as graph inputs and outputs, and running such a model ---------------------

def add_cache_io(model: onnx.ModelProto) -> int:
    """Give every SparseAttention node cache inputs and outputs (see the module docstring) in
    place of its placeholder buffers; returns how many nodes there were."""
    graph = model.graph
    shapes = {vi.name: vi.type.tensor_type for vi in (*graph.value_info, *graph.input)}
    caches = []
    for i, node in enumerate(n for n in graph.node if n.op_type == "SparseAttention"):
        key = shapes[node.input[1]]  # [batch, seq, kv heads · dim]
        kv_heads = next(a.i for a in node.attribute if a.name == "kv_num_heads")
        batch, seq, width = (d.dim_param or d.dim_value for d in key.shape.dim)
        dims = [batch, kv_heads, seq, width // kv_heads]
        entry = {}
        for j, kind in ((3, "key"), (4, "value")):
            past, present = f"past_{kind}.{i}", f"present_{kind}.{i}"
            graph.input.append(onnx.helper.make_tensor_value_info(past, key.elem_type, dims))
            graph.output.append(onnx.helper.make_tensor_value_info(present, key.elem_type, dims))
            node.input[j], node.output[j - 2] = past, present
            entry[f"past_{kind}"], entry[f"present_{kind}"] = past, present
        caches.append(entry)
    _drop_dead_nodes(graph)
    if caches:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                            METADATA_KEY: json.dumps(caches)})
    return len(caches)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    live = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))


def cache_names(session) -> list[dict[str, str]]:
    """The cache inputs/outputs of an ONNX Runtime session's model (empty if it has none)."""
    meta = session.get_modelmeta().custom_metadata_map
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else []


def run(session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run(None, feeds)`` for any exported model: for a prompt through SparseAttention
    nodes, zero caches of the prompt's length are bound to both their inputs and outputs.
    Returns the model's own outputs (the caches left out)."""
    caches = cache_names(session)
    if not caches:
        return session.run(None, feeds)
    import onnxruntime as ort

    sizes = _dim_sizes(session, feeds)
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
    inputs = {i.name: i for i in session.get_inputs()}
    for entry in caches:
        for kind in ("key", "value"):
            info = inputs[entry[f"past_{kind}"]]
            shape = [sizes[d] if isinstance(d, str) else d for d in info.shape]
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, _numpy_type(info.type)))
            binding.bind_ortvalue_input(info.name, buffer)
            binding.bind_ortvalue_output(entry[f"present_{kind}"], buffer)
    cached = {e[f"present_{k}"] for e in caches for k in ("key", "value")}
    names = [o.name for o in session.get_outputs() if o.name not in cached]
    for name in names:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    return [v.numpy() for v in binding.get_outputs()[-len(names):]]


def _dim_sizes(session, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Symbolic dim → its size in ``feeds`` (the cache's batch and length are the inputs')."""
    sizes = {}
    for info in session.get_inputs():
        if info.name in feeds:
            for d, n in zip(info.shape, feeds[info.name].shape):
                if isinstance(d, str):
                    sizes[d] = n
    return sizes


def _numpy_type(onnx_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[onnx_type]
