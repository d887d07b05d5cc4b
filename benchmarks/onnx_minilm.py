"""MiniLM on ONNX Runtime CPU, in one run: fp32, lowbit ``w8a8``, and ONNX Runtime's own
``quantize_static`` (QDQ, per-channel, MatMul only, uint8 activations) and
``quantize_dynamic`` (per-channel), both calibrated on the same sentences as lowbit.

For each: median latency at batch 8 × seq 128 with 2 threads (as a ratio to fp32, runs
interleaved so machine noise hits all alike), file size, and the cosine similarity of
mean-pooled embeddings against fp32 PyTorch on the 256 shipped evaluation sentences.

    python benchmarks/onnx_minilm.py [--recipe w8a8] [--runs 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import onnxruntime as ort
import torch

import lowbit
from lowbit.backends.onnx.export import export_onnx
from lowbit.backends.onnx.report import fusion_report
from lowbit.evaluate import mean_pool, minilm_batches, sentences
from lowbit.zoo import minilm, minilm_tokenizer

from _ort import add_run_options, latencies, output_folder, session


def embeddings(sess: ort.InferenceSession, batches) -> torch.Tensor:
    out = []
    for ids, mask in batches:
        hidden = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        out.append(mean_pool(torch.from_numpy(hidden), mask))
    return torch.cat(out)


class _Reader:
    """ONNX Runtime's calibration reader over lowbit's calibration batches."""

    def __init__(self, batches):
        self.items = iter([{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in batches])

    def get_next(self):
        return next(self.items, None)


def export_fp32(spec, path: Path) -> Path:
    """The fp32 baseline as a user gets it without lowbit: torch.onnx.export of the model."""
    program = torch.onnx.export(spec.model, spec.example_inputs, dynamo=True,
                                dynamic_shapes=spec.dynamic_shapes, input_names=["input_ids", "attention_mask"],
                                output_names=["last_hidden_state", "pooler_output"], opset_version=21)
    program.save(str(path))
    return path


def ort_baselines(fp32: Path, folder: Path, calib) -> dict[str, Path]:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = folder / "fp32-pre.onnx"
    with contextlib.chdir(folder):  # it leaves scratch files in the working directory
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib)
    static, dynamic = folder / "ort-static.onnx", folder / "ort-dynamic.onnx"
    quantize_static(str(pre), str(static), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    quantize_dynamic(str(pre), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
    return {"ort quantize_static": static, "ort quantize_dynamic": dynamic}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w8a8")
    add_run_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = output_folder(args.out, "lowbit-onnx-")
    spec = minilm()
    calib, evals = minilm_batches("calibration"), minilm_batches("eval")

    paths = {"fp32": export_fp32(spec, folder / "fp32.onnx")}
    q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                       recipe=args.recipe, calibration=calib)
    paths[f"lowbit {args.recipe}"], weights = export_onnx(q.traced, folder / f"{args.recipe}.onnx")
    print(fusion_report(paths[f"lowbit {args.recipe}"], weights.layers).text())
    paths.update(ort_baselines(paths["fp32"], folder, calib))

    with torch.no_grad():
        reference = torch.cat([mean_pool(spec.model(i, m).last_hidden_state, m) for i, m in evals])
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    enc = minilm_tokenizer()(sentences("eval")[:8], padding="max_length", max_length=128,
                             truncation=True, return_tensors="np")
    feed = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    median = latencies(sessions, feed, args.warmup, args.runs)
    torch_emb = torch.cat([mean_pool(q(i, m).last_hidden_state, m) for i, m in evals])

    print(f"\nMiniLM, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, batch 8 × seq 128, "
          f"median of {args.runs}; cosine vs fp32 PyTorch on {len(reference)} sentences")
    print(f"{'model':24s} {'latency':>10s} {'vs fp32':>8s} {'size MB':>8s} {'mean cos':>9s} {'min cos':>8s}")
    for name, path in paths.items():
        cos = torch.nn.functional.cosine_similarity(embeddings(sessions[name], evals), reference)
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20
        print(f"{name:24s} {median[name] * 1000:8.1f}ms {median[name] / median['fp32']:7.2f}x "
              f"{size:8.1f} {cos.mean().item():9.4f} {cos.min().item():8.4f}")
    ort_q = embeddings(sessions[f"lowbit {args.recipe}"], evals)
    agree = torch.nn.functional.cosine_similarity(ort_q, torch_emb)
    print(f"\nlowbit {args.recipe}: ONNX Runtime vs lowbit's torch backend, embedding cosine "
          f"mean {agree.mean().item():.5f} min {agree.min().item():.5f}")


if __name__ == "__main__":
    main()
