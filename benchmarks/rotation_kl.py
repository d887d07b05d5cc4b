"""How close rotated and unrotated recipes come to fp32 on the byte-level LMs: perplexity, and
the mean KL divergence of each quantized model's next-byte distributions from fp32's on the
same held-out windows (fidelity, where perplexity differences of a few 0.01% are noise).

    python benchmarks/rotation_kl.py [--model byte-llama --model byte-llama-192] [--recipe w4a8 --recipe w4a8-rot]
"""

from __future__ import annotations

import argparse

import lowbit
from lowbit.evaluate import BYTE_LMS, byte_windows, next_token_scores, reference_logprobs
from lowbit.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=BYTE_LMS)
    ap.add_argument("--recipe", action="append")
    args = ap.parse_args()
    calib, evals = byte_windows("calib"), byte_windows("val")
    print(f"{'model':16s} {'recipe':10s} {'perplexity':>10s} {'KL vs fp32':>11s}  rotation guard")
    for name in args.model or list(BYTE_LMS):
        spec = load_model(name)
        reference = reference_logprobs(spec.model, evals)
        fp32 = next_token_scores(spec.model, evals, reference)
        print(f"{name:16s} {'fp32':10s} {fp32['perplexity']:10.4f} {fp32['kl']:11.6f}")
        for recipe in args.recipe or ["w4a8", "w4a8-rot"]:
            q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                               recipe=recipe, calibration=calib, progress=False)
            r = next_token_scores(q, evals, reference)
            guard = next((n.split(":")[0] for n in q.traced.notes if n.startswith("rotation ")), "")
            print(f"{name:16s} {recipe:10s} {r['perplexity']:10.4f} {r['kl']:11.6f}  {guard}", flush=True)


if __name__ == "__main__":
    main()
