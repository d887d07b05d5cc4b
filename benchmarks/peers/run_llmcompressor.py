"""llm-compressor peer: one-shot PTQ with GPTQ / AWQ / SmoothQuant / SpinQuant / QuIP, evaluated as
the fake-quantized compressed-tensors model in memory (its forward quantizes weights and
activations) under the shared perplexity protocol. Runs inside the llm-compressor venv:

    python benchmarks/peers/run_llmcompressor.py --model lowbit/data/byte_llama \
        --calib lowbit/data/byte_llama_calib.txt --val lowbit/data/byte_llama_val.txt

Prints one JSON line per (configuration, method); see _common.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (emit, load_model, not_available, parse_args, perplexity, reference, run_method,  # noqa: E402
                     setup, versions, windows)

IGNORE = ["lm_head"]  # embeddings are not Linear, so they stay float too


def byte_tokenizer():
    """oneshot insists on a processor when given a dataset; ours is already tokenized (id ==
    byte), so a 256-entry word-level tokenizer is enough to satisfy it."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                   pad_token="<0>")


def schemes():
    """config -> a function(targets) giving the compressed-tensors QuantizationScheme."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def w(bits, strategy, group=None, sym=True):
        return QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group,
                                symmetric=sym, dynamic=False)

    def a(bits, strategy, dynamic, sym):
        return QuantizationArgs(num_bits=bits, type="int", strategy=strategy, symmetric=sym,
                                dynamic=dynamic)

    table = {
        "w4a16": (w(4, "group", 128, sym=False), None),
        "w8a8-static": (w(8, "channel"), a(8, "tensor", False, sym=False)),
        "w4a8": (w(4, "group", 128, sym=False), a(8, "token", True, sym=True)),
        "w4a4-token": (w(4, "channel"), a(4, "token", True, sym=True)),
        "w4a4-static": (w(4, "channel"), a(4, "tensor", False, sym=False)),
    }
    table["w4a4-token-rot"] = table["w4a4-token"]
    table["w4a4-static-rot"] = table["w4a4-static"]
    return {k: (lambda wa=wa: {"group_0": QuantizationScheme(targets=["Linear"], weights=wa[0],
                                                             input_activations=wa[1])})
            for k, wa in table.items()}


def methods(config: str):
    """The (name, recipe factory) pairs run for one configuration."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import (AWQModifier, QuIPModifier, SmoothQuantModifier,
                                                   SpinQuantModifier)

    groups = schemes()[config]

    def rtn():
        return [QuantizationModifier(config_groups=groups(), ignore=IGNORE)]

    def gptq():
        return [GPTQModifier(config_groups=groups(), ignore=IGNORE)]

    def awq():
        return [AWQModifier(), QuantizationModifier(config_groups=groups(), ignore=IGNORE)]

    def smooth_gptq():
        return [SmoothQuantModifier(smoothing_strength=0.5),
                GPTQModifier(config_groups=groups(), ignore=IGNORE)]

    def spin_gptq():  # QuaRot-style: R1 (residual), R2 (per head, v/o), R4 (online, down_proj input)
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"),
                GPTQModifier(config_groups=groups(), ignore=IGNORE)]

    def quip_gptq():  # random Hadamard on every Linear's input side (online for activations)
        return [QuIPModifier(rotations=["v"], transform_type="random-hadamard", ignore=IGNORE),
                GPTQModifier(config_groups=groups(), ignore=IGNORE)]

    return {
        "w4a16": [("RTN", rtn), ("GPTQ", gptq), ("AWQ", awq)],
        "w8a8-static": [("GPTQ", gptq), ("SmoothQuant+GPTQ", smooth_gptq)],
        "w4a8": [("GPTQ", gptq), ("SpinQuant+GPTQ", spin_gptq)],
        "w4a4-token": [("GPTQ", gptq), ("SmoothQuant+GPTQ", smooth_gptq)],
        "w4a4-token-rot": [("SpinQuant+GPTQ", spin_gptq), ("QuIP+GPTQ", quip_gptq)],
        "w4a4-static": [("GPTQ", gptq), ("SmoothQuant+GPTQ", smooth_gptq)],
        "w4a4-static-rot": [("SpinQuant+GPTQ", spin_gptq), ("QuIP+GPTQ", quip_gptq)],
    }[config]


def indivisible_group(model, config: str) -> str | None:
    """compressed-tensors refuses group quantization of a Linear whose input width the group
    does not divide (no kernel for a ragged last group); say which, rather than fail inside."""
    wargs = schemes()[config]()["group_0"].weights
    if wargs.group_size is None:
        return None
    import torch

    bad = sorted({m.in_features for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head"
                  and m.in_features >= wargs.group_size and m.in_features % wargs.group_size})
    if bad:
        return (f"compressed-tensors needs the group size ({wargs.group_size}) to divide every "
                f"Linear's input width; {bad} does not divide")
    return None


def cpu_only_workarounds() -> None:
    """llm-compressor logs through loguru to stdout (our JSON channel): send it to stderr.
    AWQ pins its cached activations (IntermediatesCache.pin_memory) unconditionally, which raises
    on a machine without an accelerator; pinning only speeds host-to-device copies, so on such a
    machine it is made a no-op."""
    import torch
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None


def main() -> None:
    args = parse_args(__doc__)
    setup()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    cpu_only_workarounds()

    emit(info=True, tool="llm-compressor",
         versions=versions("llmcompressor", "compressed-tensors", "torch", "transformers"))
    val = windows(args.val, args.eval_windows)
    cal = windows(args.calib, args.calib_windows, args.calib_offset)
    emit(config="fp32", method="fp32", ppl=reference(load_model(args.model), val))
    dataset = Dataset.from_dict({"input_ids": cal.tolist(),
                                 "attention_mask": torch.ones_like(cal).tolist()})
    tokenizer = byte_tokenizer()
    for config in args.configs:
        for name, recipe in methods(config):
            reason = indivisible_group(load_model(args.model), config)
            if reason:
                not_available(config, name, reason)
                continue

            def quantize_and_eval(recipe=recipe):
                active_session().reset()
                model = load_model(args.model)
                oneshot(model=model, dataset=dataset, processor=tokenizer, recipe=recipe(),
                        num_calibration_samples=len(cal), max_seq_length=cal.shape[1],
                        shuffle_calibration_samples=False)
                return perplexity(model, val)
            note = ("AWQ ran with llm-compressor's pin_memory made a no-op: it pins cached activations "
                    "unconditionally, which raises without an accelerator" if name == "AWQ" else "")
            run_method(config, name, quantize_and_eval, note)


if __name__ == "__main__":
    main()
