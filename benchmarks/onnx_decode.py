"""Weight-only int4 on ONNX Runtime CPU: one decode step (batch 1, one token, no KV cache) of
a Llama-shaped model (random weights, hidden 2048, 4 layers, intermediate 4096) and of
MiniLM, fp32 vs lowbit ``w4a16-rtn`` (int4, groups of 128 → MatMulNBits), in one run.

    python benchmarks/onnx_decode.py [--hidden 2048] [--layers 4] [--runs 50]

A decode step's cost is reading the weights (GEMV), which int4 cuts eightfold; attention
over one token is negligible here, so no KV cache is needed to measure it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import lowbit
from lowbit.backends.onnx import export_onnx, fusion_report
from lowbit.zoo import minilm, tiny_llama

from _ort import latencies, session


def measure(name: str, spec, feed: dict, folder: Path, threads: int, runs: int, recipe: str) -> None:
    fp32 = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                       recipe=recipe, calibration=[spec.example_inputs], progress=False)
    p32, _ = export_onnx(fp32.traced, folder / f"{name}-fp32.onnx")
    p4, weights = export_onnx(q.traced, folder / f"{name}-{recipe}.onnx")
    print(fusion_report(p4, weights.layers).text())
    sessions = {"fp32": session(p32, threads), recipe: session(p4, threads)}
    med = latencies(sessions, feed, 5, runs)
    size = {k: sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) / 2**20 for k, p in (("fp32", p32), (recipe, p4))}
    for k in sessions:
        print(f"  {name:12s} {k:10s} {med[k] * 1000:8.2f} ms  {med[k] / med['fp32']:5.2f}x  {size[k]:8.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--recipe", default="w4a16-rtn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="lowbit-decode-"))
    print(f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads, median of {args.runs}")
    llama = tiny_llama(layers=args.layers, hidden=args.hidden, heads=16, kv_heads=16)
    measure("llama", llama, {"input_ids": np.array([[7]], dtype=np.int64)}, folder, args.threads, args.runs,
            args.recipe)
    mini = minilm()
    feed = {"input_ids": np.array([[101]], dtype=np.int64), "attention_mask": np.ones((1, 1), dtype=np.int64)}
    measure("minilm", mini, feed, folder, args.threads, args.runs, args.recipe)


if __name__ == "__main__":
    main()
