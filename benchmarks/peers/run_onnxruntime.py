"""ONNX Runtime peer (w4a16 only): torch.onnx.export of the fp32 model, then
onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer (MatMulNBits int4 weights,
block 128, asymmetric) with its algorithms, each evaluated with an onnxruntime CPU session on
the full 256-token windows under the shared perplexity protocol. Runs inside the ORT venv:

    python benchmarks/peers/run_onnxruntime.py --model lowbit/data/byte_llama \
        --calib lowbit/data/byte_llama_calib.txt --val lowbit/data/byte_llama_val.txt

MatMulNBits quantizes weights only (activations stay float), so every other configuration is
reported as not applicable. Prints one JSON line per (configuration, method); see _common.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (emit, load_model, not_available, parse_args,  # noqa: E402
                     perplexity_from_logits, reference, run_method, setup, versions, windows)

BLOCK = 128


def export(model_dir: str, path: Path) -> None:
    import torch

    model = load_model(model_dir)
    ids = torch.zeros(2, 256, dtype=torch.long)

    class Logits(torch.nn.Module):  # input_ids -> logits, nothing else in the graph's outputs
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=256)
    torch.onnx.export(Logits(model).eval(), (ids,), str(path), dynamo=True, input_names=["input_ids"],
                      output_names=["logits"], dynamic_shapes=({0: batch, 1: seq},), external_data=False)


def session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_perplexity(path, val) -> float:
    import torch

    s = session(path)
    return perplexity_from_logits(lambda b: torch.from_numpy(s.run(["logits"], {"input_ids": b.numpy()})[0]), val)


def lm_head_nodes(model) -> list[str]:
    """MatMul nodes whose weight has the vocabulary as a dimension: lm_head stays float."""
    import onnx.numpy_helper as nh

    inits = {i.name: i for i in model.graph.initializer}
    vocab = 256
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            if vocab in tuple(nh.to_array(inits[n.input[1]]).shape)[-1:]:
                out.append(n.name)
    return out


class CalibReader:
    """ORT CalibrationDataReader over the calibration windows, one window per sample."""

    def __init__(self, cal):
        self.rows = [{"input_ids": r[None].numpy()} for r in cal]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return self.rows[self.i - 1]

    def rewind(self):
        self.i = 0

    def __iter__(self):
        return iter(self.rows)


def quantize(fp32: Path, out: Path, algo: str, cal) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model = onnx.load(str(fp32))
    exclude = lm_head_nodes(model)
    if not exclude:
        raise RuntimeError("could not find lm_head's MatMul to keep it float")
    configs = {
        "default": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=False, bits=4),
        "rtn": lambda: mnq.RTNWeightOnlyQuantConfig(),
        "gptq": lambda: mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=CalibReader(cal),
                                                      block_size=BLOCK, actorder=False, perchannel=True),
        "hqq": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4),
    }
    # ORT's INC-derived RTN/GPTQ pack asymmetric zero points across columns, which breaks when a
    # column has an odd number of blocks (K = 128 or 384 here): those two run symmetric.
    q = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK, is_symmetric=algo in ("rtn", "gptq"),
                                 nodes_to_exclude=exclude, algo_config=configs[algo]())
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    kinds = [n.op_type for n in onnx.load(str(out)).graph.node]
    if "MatMulNBits" not in kinds:
        raise RuntimeError("quantizer left no MatMulNBits node")


METHODS = [("RTN (default quantizer)", "default"), ("RTN (INC, sym)", "rtn"), ("GPTQ (INC, sym)", "gptq"),
           ("HQQ", "hqq")]


def main() -> None:
    args = parse_args(__doc__)
    setup()
    import logging

    logging.disable(logging.WARNING)  # onnx export / quantizer chatter
    emit(info=True, tool="onnxruntime", versions=versions("onnxruntime", "onnx", "torch", "transformers"))
    val = windows(args.val, args.eval_windows)
    cal = windows(args.calib, args.calib_windows, args.calib_offset)
    emit(config="fp32", method="fp32", ppl=reference(load_model(args.model), val))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lowbit-peers-ort-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32.onnx"
    try:
        export(args.model, fp32)
        emit(config="fp32", method="fp32 ONNX model", ppl=ort_perplexity(fp32, val))
    except Exception as e:  # noqa: BLE001
        from _common import one_line

        for config in args.configs:
            emit(config=config, method="export", error=f"torch.onnx.export failed: {one_line(e)}")
        return
    for config in args.configs:
        if config != "w4a16":
            not_available(config, "MatMulNBits", "MatMulNBitsQuantizer quantizes weights only; "
                          "activations stay float")
            continue
        for name, algo in METHODS:
            out = work / f"{algo}.onnx"
            note = ("symmetric: ORT's INC-derived RTN/GPTQ pack asymmetric zero points across columns "
                    "and fail when a column has an odd number of 128-blocks (K = 128, 384, 528 in these models)"
                    if algo in ("rtn", "gptq") else "")
            run_method(config, name, lambda algo=algo, out=out: (quantize(fp32, out, algo, cal),
                                                                 ort_perplexity(out, val))[1], note)


if __name__ == "__main__":
    main()
