"""How close rotated and unrotated recipes come to fp32 on the byte-level LMs: perplexity, and
the mean KL divergence of each quantized model's next-byte distributions from fp32's on the
same held-out windows (fidelity, where perplexity differences of a few 0.01% are noise).

    python benchmarks/rotation_kl.py [--model byte-llama --model byte-llama-192] [--recipe w4a8 --recipe w4a8-rot]
"""

from __future__ import annotations

import argparse

import torch

import lowbit
from lowbit.evaluate import BYTE_LMS, byte_windows, perplexity
from lowbit.zoo import load_model


def log_probs(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(ids).logits.double(), -1) for (ids,) in batches]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=BYTE_LMS)
    ap.add_argument("--recipe", action="append")
    args = ap.parse_args()
    calib, evals = byte_windows("calib"), byte_windows("val")
    print(f"{'model':16s} {'recipe':10s} {'perplexity':>10s} {'KL vs fp32':>11s}  rotation guard")
    for name in args.model or list(BYTE_LMS):
        spec = load_model(name)
        reference = log_probs(spec.model, evals)
        print(f"{name:16s} {'fp32':10s} {perplexity(spec.model, evals):10.4f} {0:11.6f}")
        for recipe in args.recipe or ["w4a8", "w4a8-rot"]:
            q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                               recipe=recipe, calibration=calib, progress=False)
            kl = [(p0.exp() * (p0 - p)).sum(-1).mean().item() for p0, p in zip(reference, log_probs(q, evals))]
            guard = next((n.split(":")[0] for n in q.traced.notes if n.startswith("rotation ")), "")
            print(f"{name:16s} {recipe:10s} {perplexity(q, evals):10.4f} {sum(kl) / len(kl):11.6f}  {guard}",
                  flush=True)


if __name__ == "__main__":
    main()
