"""Check an exported model: the ONNX checker (full), then ONNX Runtime's outputs against the
torch backend's on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lowbit.backends.onnx.sparse_attention import cache_names, run


def check(path: str | Path) -> None:
    """The ONNX checker with full checks (shape inference included); raises on failure."""
    onnx.checker.check_model(str(path), full_check=True)


def compare_with_torch(path: str | Path, module: torch.nn.Module, inputs: list[torch.Tensor],
                       provider: str = "CPUExecutionProvider") -> dict[str, float]:
    """Run both on ``inputs`` (flat, in graph-input order, which the ONNX model keeps); worst
    output's max |Δ| and cosine.
    A model with SparseAttention runs one sequence at a time, so that each attends within the
    layout the pass chose for it (in a batch they share the union of theirs)."""
    sess = ort.InferenceSession(str(path), providers=[provider])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    if cache_names(sess):  # SparseAttention's layout is one per batch; the pass's is per sequence
        rows = [run(sess, {n: a[i:i + 1] for n, a in feeds.items()}) for i in range(len(inputs[0]))]
        got = [np.concatenate(outs) for outs in zip(*rows)]
    else:
        got = run(sess, feeds)
    with torch.no_grad():
        want = _flat(module, inputs)
    worst = {"max_abs": 0.0, "cosine": 1.0}
    for g, w in zip(got, want):
        w = w.detach().float().numpy()
        g = g.astype(np.float32)
        worst["max_abs"] = max(worst["max_abs"], float(np.abs(g - w).max()))
        norms = float(np.linalg.norm(g)), float(np.linalg.norm(w))
        # two all-zero outputs agree (a model at random init can have one); one alone does not
        cosine = 1.0 if norms == (0.0, 0.0) else float((g * w).sum()) / (norms[0] * norms[1] or 1.0)
        worst["cosine"] = min(worst["cosine"], cosine)
    return worst


def _flat(module, inputs):
    from lowbit.ir.interpreter import Executor

    return Executor(module.graph).run(list(inputs))
