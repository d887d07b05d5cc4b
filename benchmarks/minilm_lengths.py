"""MiniLM embedding cosine vs fp32 when the calibration text and the text embedded differ in
length: calibrated on the 256 shipped sentences (about 16 tokens each), on the same sentences
joined into passages of about 200 tokens, or on both; evaluated on the 256 held-out sentences
and on the same sentences joined into passages. GPTQ fits its rounding to the calibration
tokens, so what it is calibrated on should look like what it will embed.

    python benchmarks/minilm_lengths.py [--recipe w4a8-rot --recipe w8a8] [--damp 0.1]

``--damp`` sets GPTQ's damping (a fraction of the Hessian's mean diagonal; recipes use 0.01).
"""

from __future__ import annotations

import argparse

import yaml

import lowbit
from lowbit.evaluate import minilm_batches, minilm_cosine, minilm_passages
from lowbit.recipes import RECIPE_DIR
from lowbit.zoo import load_model


def with_damp(recipe: str, damp: float | None) -> str | dict:
    """Built-in ``recipe`` with its ``insert-qdq`` damping set to ``damp`` (None: as it is)."""
    if damp is None:
        return recipe
    data = yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text())
    for step in data["pipeline"]:
        if isinstance(step, dict) and "insert-qdq" in step:
            step["insert-qdq"]["damp"] = damp
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append")
    ap.add_argument("--damp", type=float, help="GPTQ damping for every recipe (default: the recipe's)")
    args = ap.parse_args()
    spec = load_model("minilm")
    short, long = minilm_batches("calibration"), minilm_passages(split="calibration")
    calibrations = {"sentences": short, "passages": long, "both": long + short}
    evaluations = {"sentences": minilm_batches("eval"), "passages": minilm_passages(split="eval")}
    print("| recipe | calibrated on | " + " | ".join(f"{e}: mean / min cosine" for e in evaluations) + " |")
    print("|---|---|" + "---|" * len(evaluations))
    for recipe in args.recipe or ["w4a8-rot", "w8a8"]:
        for label, calibration in calibrations.items():
            q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                               recipe=with_damp(recipe, args.damp), calibration=calibration, progress=False)
            cells = [minilm_cosine(q, spec.model, batches) for batches in evaluations.values()]
            name = recipe if args.damp is None else f"{recipe}, damp {args.damp:g}"
            print(f"| `{name}` | {label} | " + " | ".join(f"{c['mean']:.4f} / {c['min']:.4f}" for c in cells)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
