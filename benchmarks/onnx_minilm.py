"""Encoders on ONNX Runtime CPU, in one run: lowbit ``w8a8`` against ONNX Runtime's own
pipelines on the same model:

- ``fp32``: torch.onnx.export of the model;
- ``ort optimizer fp32``: ONNX Runtime's transformer optimizer (``model_type="bert"``: fused
  attention, embedding/skip LayerNorm, GELU) on the TorchScript export, which it is built for
  (the dynamo export where torch no longer has TorchScript's);
- ``ort optimizer + quantize_dynamic``: that, then ``quantize_dynamic`` (int8 per-channel);
- ``ort quantize_static`` (QDQ, per-channel, MatMul only, uint8 activations, calibrated on the
  same sentences as lowbit) and ``ort quantize_dynamic`` on the plain export.

For each: median latency at batch 8 × each ``--seq`` with 2 threads (sessions take turns, idle
ones not spinning, so machine noise hits all alike), as ratios to the best fp32 pipeline and
to ``ort optimizer + quantize_dynamic``; file size; the cosine similarity of mean-pooled
embeddings against fp32 PyTorch on the 256 shipped evaluation sentences.

    python benchmarks/onnx_minilm.py [--recipe w8a8] [--runs 30] [--out DIR]
    python benchmarks/onnx_minilm.py --model bert-base --seq 128,384   # BERT-base shapes, random weights
    python benchmarks/onnx_minilm.py --profile    # also: lowbit's kernel time by operator type

It also prints how far ONNX Runtime's embeddings stray from lowbit's torch backend, and how
far the exported graph run by torch itself does (only the float order differs): the floor any
runtime can reach on that model.
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
from lowbit.zoo import ModelSpec, minilm, minilm_tokenizer

from _ort import add_run_options, latencies, op_profile, output_folder, session


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


def bert_base() -> ModelSpec:
    """BERT-base's shapes (hidden 768, 12 layers, 12 heads, FFN 3072), random weights (seeded),
    MiniLM's vocabulary and example inputs."""
    import transformers as tf

    small = minilm()
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=small.model.config.vocab_size, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072)
    return ModelSpec(tf.BertModel(config).eval(), small.example_inputs, small.dynamic_shapes,
                     description="BERT-base shapes, random weights")


MODELS = {"minilm": minilm, "bert-base": bert_base}
NAMES = ["input_ids", "attention_mask"]
OUTPUTS = ["last_hidden_state", "pooler_output"]


def export_fp32(spec, path: Path) -> Path:
    """The fp32 baseline as a user gets it without lowbit: torch.onnx.export of the model."""
    program = torch.onnx.export(spec.model, spec.example_inputs, dynamo=True, dynamic_shapes=spec.dynamic_shapes,
                                input_names=NAMES, output_names=OUTPUTS, opset_version=21)
    program.save(str(path))
    return path


def ort_optimized(spec, fp32: Path, folder: Path) -> Path:
    """ONNX Runtime's BERT optimizer on the TorchScript export (falling back to ``fp32``)."""
    from onnxruntime.transformers.optimizer import optimize_model

    source = folder / "fp32-torchscript.onnx"
    try:
        torch.onnx.export(spec.model, spec.example_inputs, str(source), dynamo=False, input_names=NAMES,
                          output_names=OUTPUTS, opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES})
    except Exception as e:  # a torch without the TorchScript exporter
        print(f"TorchScript export unavailable ({type(e).__name__}); optimizing the dynamo export")
        source = fp32
    config = spec.model.config
    model = optimize_model(str(source), model_type="bert", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size)
    print("ort optimizer fused:", {k: v for k, v in model.get_fused_operator_statistics().items() if v})
    path = folder / "ort-optimized.onnx"
    model.save_model_to_file(str(path))
    return path


def ort_baselines(spec, fp32: Path, folder: Path, calib) -> dict[str, Path]:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    optimized = ort_optimized(spec, fp32, folder)
    pre = folder / "fp32-pre.onnx"
    with contextlib.chdir(folder):  # it leaves scratch files in the working directory
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib)
    static, dynamic = folder / "ort-static.onnx", folder / "ort-dynamic.onnx"
    opt_dynamic = folder / "ort-optimized-dynamic.onnx"
    quantize_static(str(pre), str(static), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    quantize_dynamic(str(pre), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
    quantize_dynamic(str(optimized), str(opt_dynamic), per_channel=True, weight_type=QuantType.QInt8)
    return {"ort optimizer fp32": optimized, "ort optimizer + q_dynamic": opt_dynamic,
            "ort quantize_static": static, "ort quantize_dynamic": dynamic}


def feeds(batch: int, seq: int) -> dict:
    """``batch`` rows of ``seq`` real tokens: the evaluation sentences run together."""
    text = " ".join(sentences("eval"))
    words = text.split()
    per = len(words) // batch
    rows = [" ".join(words[i * per:(i + 1) * per]) for i in range(batch)]
    enc = minilm_tokenizer()(rows, padding="max_length", max_length=seq, truncation=True, return_tensors="np")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--seq", default="128", help="sequence lengths timed, comma-separated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="also print where lowbit's model spends its time, "
                    "by operator type (ONNX Runtime's profiler)")
    add_run_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = output_folder(args.out, "lowbit-onnx-")
    spec = MODELS[args.model]()
    calib, evals = minilm_batches("calibration"), minilm_batches("eval")

    paths = {"fp32": export_fp32(spec, folder / "fp32.onnx")}
    q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                       recipe=args.recipe, calibration=calib)
    ours = f"lowbit {args.recipe}"
    paths[ours], weights = export_onnx(q.traced, folder / f"{args.recipe}.onnx")
    print(fusion_report(paths[ours], weights.layers).text())
    paths.update(ort_baselines(spec, paths["fp32"], folder, calib))

    with torch.no_grad():
        reference = torch.cat([mean_pool(spec.model(i, m).last_hidden_state, m) for i, m in evals])
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    quality = {}
    for name in paths:
        cos = torch.nn.functional.cosine_similarity(embeddings(sessions[name], evals), reference)
        quality[name] = (cos.mean().item(), cos.min().item())
    for seq in (int(s) for s in args.seq.split(",")):
        if args.profile:
            ops = op_profile(paths[ours], feeds(args.batch, seq), args.threads)
            total = sum(ms for _, ms, _ in ops)
            print(f"\n{ours}, seq {seq}: {total:.1f} ms of kernels per run (profiled; not the timing below)")
            for op, ms, n in ops[:12]:
                print(f"  {op:28s} {ms:7.2f} ms {100 * ms / total:5.1f}%  ×{n}")
        median = latencies(sessions, feeds(args.batch, seq), args.warmup, args.runs)
        best_fp32 = min(median["fp32"], median["ort optimizer fp32"])
        print(f"\n{args.model}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, batch {args.batch} × "
              f"seq {seq}, median of {args.runs}; cosine vs fp32 PyTorch on {len(reference)} sentences")
        print(f"{'model':26s} {'latency':>10s} {'vs best fp32':>12s} {'vs opt+q_dyn':>12s} {'size MB':>8s} "
              f"{'mean cos':>9s} {'min cos':>8s}")
        for name, path in paths.items():
            size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20
            print(f"{name:26s} {median[name] * 1000:8.1f}ms {median[name] / best_fp32:11.2f}x "
                  f"{median[name] / median['ort optimizer + q_dynamic']:11.2f}x {size:8.1f} "
                  f"{quality[name][0]:9.4f} {quality[name][1]:8.4f}")
    with torch.no_grad():
        torch_emb = torch.cat([mean_pool(q(i, m).last_hidden_state, m) for i, m in evals])
        export_emb = torch.cat([mean_pool(h, m) for h, (i, m) in zip(export_graph_in_torch(q, evals), evals)])
    agree = torch.nn.functional.cosine_similarity(embeddings(sessions[ours], evals), torch_emb)
    floor = torch.nn.functional.cosine_similarity(export_emb, torch_emb)
    print(f"\n{ours}: ONNX Runtime vs lowbit's torch backend, embedding cosine "
          f"mean {agree.mean().item():.5f} min {agree.min().item():.5f}")
    print(f"{ours}: the exported graph run by torch (same math, another float order) vs the torch "
          f"backend: mean {floor.mean().item():.5f} min {floor.min().item():.5f}")


def export_graph_in_torch(q, batches):
    """The graph the ONNX export traces (fused quantized linears, its attention and GELU
    kernels), run eagerly by torch on real weights: the same quantized model as the torch backend,
    differing only in the order of float operations. How far this strays from the torch backend
    is how far any other runtime can be expected to."""
    from lowbit.backends.onnx.export import _ExportModule, lower_for_export

    graph, _, transposed = lower_for_export(q.traced)
    module = _ExportModule(graph, transposed)
    for buffer, source in module.sources.items():
        setattr(module, buffer, source())
    return [module(i, m)[0] for i, m in batches]


if __name__ == "__main__":
    main()
