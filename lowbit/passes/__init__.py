"""Passes over the IR, their registry, pipeline strings and the pass manager.

Files follow the pipeline: cleanup and canonicalization first; later passes (folding,
rotation, quantization, sparsity, lowering) each get a file of their own.
"""

from lowbit.passes import awq, canonicalize, cleanup, kv_cache, lower, quantize, reparam, rotate, smooth, sparse_attention  # noqa: F401  (registers the passes)
from lowbit.passes.base import ALIASES, PASSES, Pass, PassContext, register, register_alias
from lowbit.passes.manager import PassManager, PassRecord, run_pipeline
from lowbit.passes.pipeline import parse_pipeline
from lowbit.passes.rewriter import Rule, apply_rules, why_not

register_alias("canonicalize", ",".join([
    "remove-identities",      # dropout/clone/same-dtype casts are identities in a functional graph
    "eliminate-common-subexpressions",  # one x − mean(x) where a hand-written LayerNorm computes it twice
    "addmm-to-linear",        # GPT-2's Conv1D: one linear op for every projection
    "fuse-rms-norm",          # Llama's RMSNorm arrives as pow/mean/rsqrt/mul
    "fuse-attention",         # eager attention → sdpa, so attention passes see one op
    "fold-repeat-kv",         # grouped-query attention reads its shared heads, not copies
    "fold-batchnorm",         # inference BN is an affine map the conv/linear can absorb
    "fold-constants",         # shape/mask arithmetic on constants
    "addmm-to-linear",        # again: a matmul whose weight was transposed by a folded op (Falcon)
    "fold-norm-scale",        # Gemma's norm scale 1 + w, a constant once folded
    "eliminate-common-subexpressions",
    "eliminate-dead-code",
]))

__all__ = ["ALIASES", "PASSES", "Pass", "PassContext", "PassManager", "PassRecord", "Rule",
           "apply_rules", "parse_pipeline", "register", "register_alias", "run_pipeline", "why_not"]
