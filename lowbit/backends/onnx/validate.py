"""Check an exported model: the ONNX checker (full), then ONNX Runtime's outputs against the
torch backend's on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch


def check(path: str | Path) -> None:
    """The ONNX checker with full checks (shape inference included); raises on failure."""
    onnx.checker.check_model(str(path), full_check=True)


def compare_with_torch(path: str | Path, module: torch.nn.Module, input_names: list[str],
                       inputs: list[torch.Tensor], provider: str = "CPUExecutionProvider") -> dict[str, float]:
    """Run both on ``inputs`` (flat, in graph-input order); worst output's max |Δ| and cosine."""
    sess = ort.InferenceSession(str(path), providers=[provider])
    got = sess.run(None, {n: t.numpy() for n, t in zip(input_names, inputs)})
    with torch.no_grad():
        want = _flat(module, inputs)
    worst = {"max_abs": 0.0, "cosine": 1.0}
    for g, w in zip(got, want):
        w = w.detach().float().numpy()
        g = g.astype(np.float32)
        worst["max_abs"] = max(worst["max_abs"], float(np.abs(g - w).max()))
        denom = float(np.linalg.norm(g) * np.linalg.norm(w)) or 1.0
        worst["cosine"] = min(worst["cosine"], float((g * w).sum()) / denom)
    return worst


def _flat(module, inputs):
    from lowbit.ir.interpreter import Executor

    return Executor(module.graph).run(list(inputs))
