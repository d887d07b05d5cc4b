"""A model over 2 GB (random weights, Llama-shaped: hidden 4096, 4 layers, ≈ 2.3 GB fp32)
exports with external data and loads and runs in ONNX Runtime.

    python benchmarks/onnx_large.py [--layers 4] [--hidden 4096]

Too slow and memory-hungry for CI (about 10 GB of memory at peak); run it by hand.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import lowbit
from lowbit.zoo import tiny_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    args = ap.parse_args()
    spec = tiny_llama(layers=args.layers, hidden=args.hidden, heads=32, kv_heads=8)
    params = sum(p.numel() for p in spec.model.parameters())
    print(f"Llama-shaped, {args.layers} layers, hidden {args.hidden}: {params / 1e6:.0f}M params, "
          f"{params * 4 / 2**30:.2f} GiB fp32")
    start = time.perf_counter()
    compiled = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    folder = Path(tempfile.mkdtemp(prefix="lowbit-large-"))
    path, _ = compiled.export_onnx(folder / "model.onnx")
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    print(f"exported in {time.perf_counter() - start:.0f} s: " +
          ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in sorted(files.items())))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = spec.example_inputs[0]
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = spec.model(ids).logits.numpy()
    print(f"ONNX Runtime loaded it and ran: max |diff| vs PyTorch {np.abs(got - want).max():.2e}")
    print("external data used:", any(name.endswith(".data") for name in files))


if __name__ == "__main__":
    main()
