"""Every built-in recipe on tiny-llama, byte-llama and MiniLM: compile (real calibration data
for the shipped models), save, load, and check that the loaded model is bit-exact with the one
saved on the torch backend and that its ONNX export is byte-identical; prints one row per pair
with the save's size and the save/load times.

    python benchmarks/save_load.py [--models tiny-llama,byte-llama,minilm] [--recipes w8a8,...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

import lowbit
from lowbit import zoo
from lowbit.evaluate import byte_windows, minilm_batches
from lowbit.recipes import builtin_recipes


def _setup(name: str):
    if name == "tiny-llama":
        spec = zoo.tiny_llama()
        return spec, [(zoo._token_inputs(256, seed=i),) for i in range(4)], (zoo._token_inputs(256, batch=2, seq=9),)
    if name == "minilm":
        spec = zoo.minilm()
        calib = minilm_batches("calibration")[:4]
        return spec, calib, minilm_batches("eval")[0]
    spec = zoo.load_model(name)
    return spec, byte_windows("calib")[:4], byte_windows("val")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-llama,byte-llama,minilm")
    ap.add_argument("--recipes", default=",".join(builtin_recipes()))
    args = ap.parse_args()
    rows, failures = [], 0
    for name in args.models.split(","):
        spec, calibration, call = _setup(name)
        traced = lowbit.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
        for recipe in args.recipes.split(","):
            q = lowbit.compile(traced, recipe=recipe, calibration=calibration, progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                folder = q.save(Path(tmp) / "saved")
                t1 = time.perf_counter()
                loaded = lowbit.load(folder)
                t2 = time.perf_counter()
                size = sum(f.stat().st_size for f in folder.iterdir())
                with torch.no_grad():
                    same = all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(q(*call)),
                                                                  pytree.tree_leaves(loaded(*call))))
                a, _ = q.export_onnx(Path(tmp) / "a" / "model.onnx")
                b, _ = loaded.export_onnx(Path(tmp) / "b" / "model.onnx")
                onnx_same = a.read_bytes() == b.read_bytes()
            failures += not (same and onnx_same)
            rows.append((name, recipe, same, onnx_same, size / 2**20, t1 - t0, t2 - t1))
            print(f"{name:11s} {recipe:16s} bit-exact {same!s:5s}  ONNX identical {onnx_same!s:5s}  "
                  f"{size / 2**20:7.2f} MB  save {t1 - t0:5.2f}s  load {t2 - t1:5.2f}s", flush=True)
    print(f"\n{len(rows)} model/recipe pairs, {failures} not bit-exact or not byte-identical")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
