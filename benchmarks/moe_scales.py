"""What folding AWQ and SmoothQuant scales into MoE experts is worth, on the trained byte-level
mixture of experts (``byte-moe``): each recipe that scales runs twice, as shipped and with its
scaling pass told to leave the experts alone (``experts=false``), on the same calibration and
held-out windows. Perplexity per byte, and the mean KL divergence of the next-byte distributions
from fp32's (the steadier figure close to fp32).

    python benchmarks/moe_scales.py [--recipe w4a16 --recipe w8a8] [--model byte-moe]
    python benchmarks/moe_scales.py --layer-time   # AWQ's time on one OLMoE-sized layer

``--layer-time`` builds one layer of OLMoE-1B-7B's shape (hidden 2048, 64 experts of width 1024,
8 per token, random weights, 424M parameters) and times ``awq`` with and without the experts,
in turns, calibrated on 4 batches of 4 × 256 tokens.
"""

from __future__ import annotations

import argparse
import re
import time

import lowbit
from lowbit.evaluate import byte_windows, next_token_scores, reference_logprobs
from lowbit.quant.experts import GROUPED_MM
from lowbit.recipes import recipe_pipeline
from lowbit.zoo import load_model

RECIPES = ["w4a16-rtn", "w4a16", "w4a16-awq-gptq", "w8a8", "w8a8-static", "w8a8-dynamic"]
SCALING = ("awq", "smooth-quant")


def without_experts(pipeline: str) -> str | None:
    """``pipeline`` with every scaling pass told ``experts=false`` (None: it has no such pass)."""
    out, n = re.subn(r"\b(awq|smooth-quant)\{", r"\1{experts=false,", pipeline)
    return out if n else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="byte-moe")
    ap.add_argument("--recipe", action="append")
    ap.add_argument("--layer-time", action="store_true", help="time AWQ on one OLMoE-sized layer instead")
    args = ap.parse_args()
    if args.layer_time:
        return layer_time()
    spec = load_model(args.model)
    calib, evals = byte_windows("calib"), byte_windows("val")
    reference = reference_logprobs(spec.model, evals)
    fp32 = next_token_scores(spec.model, evals, reference)["perplexity"]
    print(f"{args.model}: fp32 perplexity {fp32:.4f}")
    print("| recipe | experts scaled | perplexity | vs fp32 | KL (1e-3 nats/byte) | expert inputs static / per token "
          "| compile s |")
    print("|---|---|---|---|---|---|---|")
    for recipe in args.recipe or RECIPES:
        pipeline = recipe_pipeline(recipe)
        runs = [("yes", pipeline)]
        if (plain := without_experts(pipeline)) is not None:
            runs.append(("no", plain))
        for scaled, text in runs:
            start = time.perf_counter()
            q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                               pipeline=text, calibration=calib, progress=False)
            took = time.perf_counter() - start
            r = next_token_scores(q, evals, reference)
            print(f"| `{recipe}` | {scaled if any(p in text for p in SCALING) else '—'} | {r['perplexity']:.4f} | "
                  f"{100 * (r['perplexity'] / fp32 - 1):+.2f}% | {1e3 * r['kl']:.3f} | {expert_inputs(q)} | {took:.0f} |",
                  flush=True)


def layer_time(turns: int = 2) -> None:
    import torch
    import transformers as tf

    cfg = tf.OlmoeConfig(vocab_size=1024, hidden_size=2048, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                         eos_token_id=None, pad_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = tf.OlmoeForCausalLM(cfg).eval()
    calib = [(torch.randint(0, 1024, (4, 256), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    traced = lowbit.trace(model, calib[0])
    times: dict[str, list[float]] = {}
    for _ in range(turns):
        for pipeline in ("awq{weights=int4/group128/asym}", "awq{weights=int4/group128/asym,experts=false}"):
            start = time.perf_counter()
            lowbit.compile(traced, pipeline=pipeline, calibration=calib, progress=False)
            times.setdefault(pipeline, []).append(time.perf_counter() - start)
    for pipeline, t in times.items():
        print(f"{pipeline}: {min(t):.1f} s (best of {len(t)})")


def expert_inputs(q) -> str:
    """How the experts' inputs are quantized: static quantizers / per-token ones (— if float)."""
    kinds = [n.operand(0).producer.operand(0).producer for n in q.graph.nodes if n.op in GROUPED_MM
             and n.operand(0).producer is not None and n.operand(0).producer.op == "quant.dequantize"]
    static = sum(k is not None and k.op == "quant.quantize" for k in kinds)
    dynamic = sum(k is not None and k.op == "quant.dynamic_quantize" for k in kinds)
    return f"{static} / {dynamic}" if static or dynamic else "—"


if __name__ == "__main__":
    main()
