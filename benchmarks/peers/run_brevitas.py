"""Brevitas peer: its LLM entry point (brevitas_examples.llm.main.quantize_llm, the code behind
`brevitas_ptq_llm`), run with our model and our calibration windows instead of a hub model and
wikitext, then evaluated as the fake-quantized torch model under the shared perplexity protocol.
Runs inside the Brevitas venv:

    python benchmarks/peers/run_brevitas.py --model lowbit/data/byte_llama \
        --calib lowbit/data/byte_llama_calib.txt --val lowbit/data/byte_llama_val.txt

Rotation is Brevitas' QuaRot-style fused Hadamard rotation (`--rotation fused_no_fx`) with online
Hadamards for the layers it cannot fuse (`--rotation-orphan-sink`) and across attention's v/o
(`--rotation-sdpa-regions`). Prints one JSON line per (configuration, method); see _common.py.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (emit, load_model, parse_args, perplexity, reference, run_method, setup,  # noqa: E402
                     versions, windows)

# configuration -> the llm example's options (names as in `brevitas_ptq_llm --help`, dashes as _)
SCHEMES = {
    "w4a16": dict(weight_bit_width=4, weight_quant_granularity="per_group", weight_group_size=128,
                  weight_quant_type="asym", quantize_weight_zero_point=True),
    "w8a8-static": dict(weight_bit_width=8, weight_quant_granularity="per_channel", weight_quant_type="sym",
                        input_bit_width=8, input_scale_type="static", input_quant_granularity="per_tensor",
                        input_quant_type="asym", quantize_input_zero_point=True, act_calibration=True),
    "w4a8": dict(weight_bit_width=4, weight_quant_granularity="per_group", weight_group_size=128,
                 weight_quant_type="asym", quantize_weight_zero_point=True,
                 input_bit_width=8, input_scale_type="dynamic", input_quant_granularity="per_row",
                 input_quant_type="sym"),
    "w4a4-token": dict(weight_bit_width=4, weight_quant_granularity="per_channel", weight_quant_type="sym",
                       input_bit_width=4, input_scale_type="dynamic", input_quant_granularity="per_row",
                       input_quant_type="sym"),
    "w4a4-static": dict(weight_bit_width=4, weight_quant_granularity="per_channel", weight_quant_type="sym",
                        input_bit_width=4, input_scale_type="static", input_quant_granularity="per_tensor",
                        input_quant_type="asym", quantize_input_zero_point=True, act_calibration=True),
}
SCHEMES["w4a4-token-rot"] = SCHEMES["w4a4-token"]
SCHEMES["w4a4-static-rot"] = SCHEMES["w4a4-static"]

GPTQ = dict(gptq=True)
AWQ = dict(awq_scale=True, awq_clip=True)
SMOOTH = dict(act_equalization="layerwise", act_equalization_alpha=0.5)
ROTATE = dict(rotation="fused_no_fx", replace_rmsnorm=True, rotation_mode="had",
              rotation_orphan_sink=True, rotation_sdpa_regions=True)

METHODS = {
    "w4a16": [("RTN", {}), ("GPTQ", GPTQ), ("AWQ", AWQ)],
    "w8a8-static": [("GPTQ", GPTQ), ("SmoothQuant+GPTQ", {**SMOOTH, **GPTQ})],
    "w4a8": [("GPTQ", GPTQ), ("Hadamard rotation+GPTQ", {**ROTATE, **GPTQ})],
    "w4a4-token": [("GPTQ", GPTQ), ("SmoothQuant+GPTQ", {**SMOOTH, **GPTQ})],
    "w4a4-token-rot": [("Hadamard rotation+GPTQ", {**ROTATE, **GPTQ})],
    "w4a4-static": [("GPTQ", GPTQ), ("SmoothQuant+GPTQ", {**SMOOTH, **GPTQ})],
    "w4a4-static-rot": [("Hadamard rotation+GPTQ", {**ROTATE, **GPTQ})],
}


class ByteTokenizer:
    """Stands in for AutoTokenizer.from_pretrained: the model has no tokenizer (id == byte) and
    the example only hands the tokenizer to the dataset loader, which we replace too."""

    pad_token_id = 0
    eos_token_id = None
    bos_token_id = None


class CachingLM:
    """AutoModelForCausalLM with ``use_cache`` on: our checkpoints say use_cache=False, and the
    rotation path exports the model through transformers' TorchExportableModuleForDecoderOnlyLM,
    which refuses a model without a cache. Logits are the same either way (evaluation passes no
    cache)."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(*args, **kwargs)
        model.config.use_cache = True
        return model


def quantize(model_dir: str, cal, options: dict):
    import numpy as np
    import brevitas_examples.llm.main as bmain
    from brevitas_examples.common.accelerate_utils.accelerate import remove_hooks
    from brevitas_examples.llm.llm_args import create_args_parser

    parser = create_args_parser()
    args = parser.parse_args([])
    args.model, args.dtype, args.seqlen, args.nsamples = model_dir, "float32", cal.shape[1], len(cal)
    args.export_target = None
    # 8 windows per calibration batch (the example's default is 1): same statistics, faster.
    # (Block-wise GPTQ, --gpxq-block-name, would be faster still but sends tensors to 'cuda'.)
    args.calibration_batch_size = 8
    for key, value in options.items():
        if not hasattr(args, key):
            raise KeyError(f"brevitas llm example has no option {key!r}")
        setattr(args, key, value)

    samples = [{"input_ids": np.asarray(row)} for row in cal.numpy()]
    bmain.get_dataset_for_model = lambda *a, **k: samples
    bmain.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: ByteTokenizer())
    bmain.AutoModelForCausalLM = CachingLM
    with contextlib.redirect_stdout(io.StringIO()) as log:  # the example prints its progress
        _, model = bmain.quantize_llm(args)
    sys.stderr.write(log.getvalue())
    remove_hooks(model)
    return model.eval()


def main() -> None:
    args = parse_args(__doc__)
    setup()
    emit(info=True, tool="brevitas", versions=versions("brevitas", "torch", "transformers"))
    val = windows(args.val, args.eval_windows)
    cal = windows(args.calib, args.calib_windows, args.calib_offset)
    emit(config="fp32", method="fp32", ppl=reference(load_model(args.model), val))
    for config in args.configs:
        for name, extra in METHODS[config]:
            run_method(config, name,
                       lambda extra=extra: perplexity(quantize(args.model, cal, {**SCHEMES[config], **extra}), val))


if __name__ == "__main__":
    main()
