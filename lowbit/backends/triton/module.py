"""``TritonModule``: the torch backend's module with the quantized linears, Hadamard rotations
and block-sparse attention dispatched to Triton kernels (torch custom ops).

Weights are packed once, here; every other node runs its torch reference. On a machine without
CUDA (and without ``TRITON_INTERPRET=1``) each custom op runs its own torch reference, so the
module still runs, as slowly as the torch backend.

    fast = lowbit.compile(model, (ids,), recipe="w8a8", calibration=batches, backend="triton")
    fast = fast.to("cuda").half()
"""

from __future__ import annotations

import torch

from lowbit.backends.torch.module import CompiledModule
from lowbit.backends.torch.packed import repacked_constants
from lowbit.backends.triton import linear
from lowbit.frontend.trace import TracedModel
from lowbit.ir.graph import Graph, Node

# The lowering the kernels need, after the recipe: every pass is exact (see passes/lower.py).
PIPELINE = "fuse-quantized-linear,fuse-static-linear,fuse-hadamard-quantize"


def _key(node: Node) -> str:
    return "n_" + "".join(ch if ch.isalnum() else "_" for ch in node.results[0].name)  # split, topk: several


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    from lowbit.backends.triton.quantize import hadamard

    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return hadamard(flat).reshape(x.shape)


def _attention(q, k, v, block_mask, mask, *, block, causal, scale):
    """The kernel takes causality, not a token mask: with the model's own mask the reference runs
    (``sparse-attention{causal=true}`` drops a decoder's mask)."""
    from lowbit.backends.triton.attention import block_sparse_attention
    from lowbit.ir.dialects.attn import block_sparse_sdpa

    if mask is not None:
        return block_sparse_sdpa(q, k, v, block_mask, mask, block=block, causal=causal, scale=scale)
    return block_sparse_attention(q, k, v, block_mask, block, causal, scale)


class TritonModule(CompiledModule):
    """A ``CompiledModule`` whose quantized ops call Triton kernels; ``kernel_nodes()`` says
    which nodes do."""

    def __init__(self, traced: TracedModel, records: list | None = None):
        self._packed = _packed_constants(traced.graph)  # read by _keeps_constant during __init__
        super().__init__(traced, records)
        self.kernels = torch.nn.ModuleDict()
        for node in self.graph.nodes:
            module = linear.prepare(node, self.graph)
            if module is not None:
                self.kernels[_key(node)] = module

    def _keeps_constant(self, name: str) -> bool:
        return name not in self._packed

    def _override(self, node: Node):
        key = _key(node)
        if key in self.kernels:
            return self.kernels[key], {}
        if node.op == "rotate.hadamard":
            return _hadamard, {}
        if node.op == "attn.block_sparse_sdpa":
            return _attention, {k: node.attrs.get(k, d) for k, d in (("block", 64), ("causal", False), ("scale", None))}
        return None

    def kernel_nodes(self) -> dict[str, str]:
        """Node result name → the kernel it runs on ("scaled_mm", "w4a16_mm", "hadamard",
        "block_sparse_attention")."""
        out = {}
        for node in self.graph.nodes:
            key = _key(node)
            if key in self.kernels:
                name = "w4a16_mm" if isinstance(self.kernels[key], linear.Int4Linear) else "scaled_mm"
                out[node.result.name] = ("hadamard_quant+" if node.attrs.get("hadamard") else "") + name
            elif node.op == "rotate.hadamard":
                out[node.result.name] = "hadamard"
            elif node.op == "attn.block_sparse_sdpa":
                out[node.result.name] = "block_sparse_attention"
        return out


def _packed_constants(graph: Graph) -> set[str]:
    """Constants read only by nodes whose weights are repacked (no one else needs them)."""
    return repacked_constants(graph, lambda node, g: linear.kind(node, g) is not None, linear.consumed)
