"""Rotated MiniLM on ONNX Runtime CPU, in one run: lowbit ``w8a8`` and ``w8a8-rot`` (online
Hadamard before every linear of this post-norm model), the rotation lowered both ways ONNX
allows: two MatMuls with the small Hadamard factors, and butterfly stages of reshape/add/sub.

For each: median latency at batch 8 × seq 128 with 2 threads (as a ratio to ``w8a8``; the
sessions take turns), the embedding cosine vs fp32 PyTorch on the 256 shipped evaluation
sentences, and ONNX Runtime vs lowbit's torch backend on the same model.

    python benchmarks/onnx_rotation.py [--runs 30] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch

import lowbit
from lowbit.evaluate import mean_pool, minilm_batches, sentences
from lowbit.zoo import minilm, minilm_tokenizer

from _ort import add_run_options, latencies, output_folder, session
from onnx_minilm import embeddings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = output_folder(args.out, "lowbit-rot-")
    spec = minilm()
    calib, evals = minilm_batches("calibration"), minilm_batches("eval")

    compiled, paths = {}, {}
    for recipe in ("w8a8", "w8a8-rot"):
        compiled[recipe] = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                                          recipe=recipe, calibration=calib)
    paths["w8a8"], _ = compiled["w8a8"].export_onnx(folder / "w8a8.onnx")
    for lowering in ("matmul", "staged"):
        paths[f"w8a8-rot ({lowering})"], _ = compiled["w8a8-rot"].export_onnx(
            folder / f"w8a8-rot-{lowering}.onnx", hadamard=lowering)

    with torch.no_grad():
        reference = torch.cat([mean_pool(spec.model(i, m).last_hidden_state, m) for i, m in evals])
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    enc = minilm_tokenizer()(sentences("eval")[:8], padding="max_length", max_length=128,
                             truncation=True, return_tensors="np")
    median = latencies(sessions, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                       args.warmup, args.runs)

    print(f"\nMiniLM, ONNX Runtime CPU, {args.threads} threads, batch 8 × seq 128, median of {args.runs}")
    print(f"{'model':22s} {'latency':>10s} {'vs w8a8':>8s} {'cos fp32':>9s} {'ORT vs torch':>13s}")
    for name, path in paths.items():
        ort_emb = embeddings(sessions[name], evals)
        q = compiled[name.split(" ")[0]]
        torch_emb = torch.cat([mean_pool(q(i, m).last_hidden_state, m) for i, m in evals])
        cos = torch.nn.functional.cosine_similarity(ort_emb, reference).mean().item()
        agree = torch.nn.functional.cosine_similarity(ort_emb, torch_emb)
        print(f"{name:22s} {median[name] * 1000:8.1f}ms {median[name] / median['w8a8']:7.2f}x "
              f"{cos:9.4f} {agree.mean().item():8.5f} (min {agree.min().item():.4f})")


if __name__ == "__main__":
    main()
