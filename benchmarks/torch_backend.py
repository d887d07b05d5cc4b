"""Latency of the torch backend against eager PyTorch, on MiniLM in fp32.

Loads all-MiniLM-L6-v2 (``lowbit.zoo.minilm``), compiles it with ``lowbit.compile`` (trace +
``canonicalize``, run by the torch backend's executor), and feeds both the eager model and
the compiled module the same batch of 8 real sentences padded to 128 tokens. It prints how
far the compiled outputs are from eager, then times both with 2 torch threads: 3 warmup calls
each, then interleaved calls (eager, compiled, eager, ...) so that drift in the machine's
speed hits both alike. The target is median(compiled) / median(eager) <= 1.2: the backend
should cost little beyond the torch calls themselves. The ratio is measured in this one run.

    python benchmarks/torch_backend.py
    python benchmarks/torch_backend.py --runs 40 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowbit
from lowbit.zoo import minilm, minilm_tokenizer

TARGET_RATIO = 1.2
BATCH, SEQ = 8, 128

SENTENCES = [
    "A sparrow landed on the windowsill and looked in at the kitchen.",
    "The train to the coast leaves at seven and arrives a little before noon.",
    "Compilers turn programs written for people into programs written for machines.",
    "She planted tomatoes, basil and two rows of beans along the fence.",
    "Low-bit integer arithmetic trades a little accuracy for a lot of speed.",
    "The museum's new wing holds paintings that were never shown in public before.",
    "After the storm the river rose over its banks and flooded the lower fields.",
    "He tuned the old piano himself, one string at a time, over a whole weekend.",
]


def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    enc = minilm_tokenizer()(SENTENCES[:BATCH], padding="max_length", max_length=SEQ,
                             truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (elementwise ratios blow up near zero)."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def time_call(fn, inputs: tuple) -> float:
    start = time.perf_counter()
    fn(*inputs)
    return time.perf_counter() - start


def time_interleaved(eager, compiled, inputs: tuple, warmup: int, runs: int) -> tuple[list, list]:
    """Per-call seconds of each, alternating which goes first so neither always follows the other."""
    for _ in range(warmup):
        eager(*inputs)
        compiled(*inputs)
    eager_s, compiled_s = [], []
    for i in range(runs):
        if i % 2 == 0:
            eager_s.append(time_call(eager, inputs))
            compiled_s.append(time_call(compiled, inputs))
        else:
            compiled_s.append(time_call(compiled, inputs))
            eager_s.append(time_call(eager, inputs))
    return eager_s, compiled_s


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each first")
    parser.add_argument("--runs", type=int, default=20, help="timed calls of each")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    spec = minilm()
    inputs = make_inputs()

    start = time.perf_counter()
    compiled = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    print(f"compiled in {time.perf_counter() - start:.1f} s ({len(compiled.graph)} nodes)")

    with torch.no_grad():  # eager in inference mode, as the compiled module always runs
        expected = spec.model(*inputs).last_hidden_state
        actual = compiled(*inputs).last_hidden_state
        print(f"last_hidden_state {tuple(actual.shape)}: max relative error "
              f"{max_relative_error(actual, expected):.2e}")
        eager_s, compiled_s = time_interleaved(spec.model, compiled, inputs, args.warmup, args.runs)

    eager_ms = statistics.median(eager_s) * 1000
    compiled_ms = statistics.median(compiled_s) * 1000
    ratio = compiled_ms / eager_ms
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"\nMiniLM fp32, batch {BATCH} x seq {SEQ}, {torch.get_num_threads()} threads, "
          f"median of {args.runs} interleaved runs after {args.warmup} warmup")
    print(f"  eager     {eager_ms:8.1f} ms")
    print(f"  compiled  {compiled_ms:8.1f} ms")
    print(f"  compiled / eager = {ratio:.3f}  (target <= {TARGET_RATIO}: {verdict})")


if __name__ == "__main__":
    main()
