"""Block-sparse attention on ONNX Runtime, both lowerings, in one run.

    python benchmarks/onnx_sparse_attention.py [--seq 2048] [--runs 10] [--out DIR]

A Llama-shaped model built from a config (random weights; hidden 1024, 8 heads of dim 128, 2
layers), batch 1, causal prompt of ``--seq`` tokens, fp32 on ONNX Runtime's CPU provider.
Exported without the pass (dense causal attention: the baseline) and with
``sparse-attention{method=sparsity, block=64, causal=true}`` at 50% and 90% block sparsity,
each lowered both ways: dense attention with the block mask (``--sparse-attention dense``) and
``com.microsoft.SparseAttention`` (``contrib``). Per model: median latency as a ratio to the
baseline (the sessions take turns), the block sparsity reached, and ONNX Runtime vs lowbit's
torch backend on the same input.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.backends.onnx.sparse_attention import run
from lowbit.passes.sparse_attention import attention_quality

from _ort import add_run_options, latencies, output_folder, session


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
                         head_dim=128, num_hidden_layers=2, vocab_size=256, max_position_embeddings=16384,
                         use_cache=False)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(ap)
    ap.add_argument("--seq", type=int, default=2048)
    ap.set_defaults(runs=10, warmup=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = output_folder(args.out, "lowbit-sparse-onnx-")
    model = llama()
    example = (torch.randint(0, 256, (2, 200)),)  # batch 2: torch.export would fix a batch of 1
    shapes = ({0: "batch", 1: "seq"},)
    ids = torch.randint(0, 256, (1, args.seq), generator=torch.Generator().manual_seed(1))

    compiled, paths, sparsity = {}, {}, {}
    compiled["dense"] = lowbit.compile(model, example, dynamic_shapes=shapes, progress=False)
    paths["dense (no pass)"], _ = compiled["dense"].export_onnx(folder / "dense.onnx")
    for target in (0.5, 0.9):
        pipeline = f"sparse-attention{{method=sparsity,sparsity={target},block=64,causal=true}}"
        c = compiled[target] = lowbit.compile(model, example, dynamic_shapes=shapes, progress=False,
                                              pipeline=pipeline)
        sparsity[target] = float(np.mean([r["sparsity"] for r in attention_quality(c.graph, [ids])]))
        for lowering in ("dense", "contrib"):
            paths[f"{target:.0%} {lowering}"], _ = c.export_onnx(folder / f"sparse{target}-{lowering}.onnx",
                                                                 sparse_attention=lowering)

    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    feed = {"input_ids": ids.numpy()}
    median = latencies(sessions, feed, args.warmup, args.runs)
    base = median["dense (no pass)"]
    print(f"\nLlama-shaped (hidden 1024, 8×128 heads, 2 layers), ONNX Runtime CPU, {args.threads} threads, "
          f"batch 1 × seq {args.seq}, median of {args.runs}")
    print(f"{'model':18s} {'latency':>10s} {'vs dense':>9s} {'sparsity':>9s} {'ORT vs torch':>13s}")
    with torch.no_grad():
        for name, path in paths.items():
            key = "dense" if name.startswith("dense") else float(name.split("%")[0]) / 100
            want = compiled[key](ids).logits.numpy()
            diff = float(np.abs(run(sessions[name], feed)[0] - want).max())
            reached = f"{sparsity[key]:.0%}" if key != "dense" else "-"
            print(f"{name:18s} {median[name] * 1000:8.1f}ms {median[name] / base:8.2f}x {reached:>9s} {diff:13.1e}")
    print(f"\nmodels in {folder}")


if __name__ == "__main__":
    main()
