"""Peak memory of calibrating MiniLM: w8a8 over the 256 shipped calibration sentences at
batch 32 (padded per batch, up to 128 tokens), measured as the process's peak resident set.

    python benchmarks/calibration_memory.py

Calibration streams: observers keep fixed-size statistics (min/max, per-channel absmax, a
2048-bin histogram), never the activations, so the peak is the model plus one batch's
activations. The target is < 4 GB.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import lowbit
from lowbit.evaluate import minilm_batches
from lowbit.zoo import minilm


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    spec = minilm()
    batches = minilm_batches("calibration", batch_size=args.batch_size)
    before = peak_rss_mb()
    start = time.perf_counter()
    lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                   recipe=args.recipe, calibration=batches)
    seconds = time.perf_counter() - start
    after = peak_rss_mb()
    sentences = sum(len(b[0]) for b in batches)
    print(f"{args.recipe}: {sentences} sentences in {len(batches)} batches of {args.batch_size}, "
          f"{seconds:.1f} s")
    print(f"peak RSS before compile {before:.0f} MB, after {after:.0f} MB "
          f"(target < 4096 MB: {'met' if after < 4096 else 'NOT met'})")


if __name__ == "__main__":
    main()
