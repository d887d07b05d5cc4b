"""llm-compressor's ``oneshot`` on a model folder, for ``benchmarks/scale.py``: GPTQ W4A16 (int4,
group 128, asymmetric; lm_head ignored) with its sequential pipeline, on ``SEQUENCES`` random
sequences of ``LENGTH`` tokens (the same seed as lowbit's run), the model loaded as its
documentation does (``dtype="auto"``). Runs inside the llm-compressor venv:

    python benchmarks/peers/run_llmcompressor_scale.py FOLDER SEQUENCES LENGTH

Prints one JSON line: compile_s (load + oneshot) and compile_rss_gb (the process's peak
resident set).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run_llmcompressor import byte_tokenizer, cpu_only_workarounds  # noqa: E402


def main() -> None:
    folder, sequences, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    cpu_only_workarounds()
    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(1)  # benchmarks/scale.py's calibration()
    ids = torch.cat([torch.randint(0, 32000, (1, length), generator=gen) for _ in range(sequences)])
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=128, symmetric=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    oneshot(model=model, dataset=dataset, processor=byte_tokenizer(),
            recipe=[GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])],
            num_calibration_samples=sequences, max_seq_length=length, shuffle_calibration_samples=False,
            pipeline="sequential")
    seconds = time.perf_counter() - start
    print(json.dumps({"compile_s": seconds, "compile_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "dtype": str(next(model.parameters()).dtype)}))


if __name__ == "__main__":
    main()
