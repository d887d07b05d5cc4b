"""Run the coverage matrix (``lowbit.families``) on every family and write ``docs/models.md``.

    python scripts/models_table.py            # all families, about 5 minutes on 2 cores
    python scripts/models_table.py llama bert # some, printed only
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from lowbit.families import CELLS, FAMILIES, run_family
from lowbit.io import atomic_write_text

DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"

INTRO = """# Models: the coverage matrix

Each row is a transformers architecture built from its config class with only the sizes made
small (width 64, one to three layers, 4 heads, vocabulary 256, 32×32 images, Mamba-2 scans in
chunks of 16 tokens); every other setting keeps its default, `use_cache=True` included. Random
weights. The cells:

- **compile**: `lowbit.compile(model, example)` equals eager (≤ 1e-4 relative) at the example
  and at another batch size and length.
- **w8a8**: `recipe="w8a8"` calibrated on three batches of lengths 7, 12 and 20 (images and
  audio: batch sizes 1, 2, 3), run at a fourth shape, within {w8a8} relative error of eager.
- **w4a16**: AWQ int4 weights, the same calibration, within {w4a16}. In these and the rotation
  cell every layer's weight but the output head's is quantized, MoE experts included (a float
  one fails the cell).
- **rotation**: `w8a8-rot` (fuse-norms, rotate-residual, online Hadamards), within {rotation};
  a note is what the rotation passes said they could not fold (online Hadamards still run).
- **onnx**: the `w8a8` model exported and run by ONNX Runtime at two shapes, cosine ≥ 0.999
  against the torch backend.
- **triton**: `w8a8` on the triton backend (Triton's interpreter here, no GPU), within 1e-2 of
  the torch backend.
- **generate** (causal LMs, traced as one decode step with their key/value cache, and the
  recurrent layers' states where they have them): 12 greedy tokens equal transformers'
  `generate`, and the `w8a8` model generates with an int8 cache of fewer bytes (a note for a
  model without attention layers, whose states stay float); — for models that do not generate.
  The encoder-decoders (T5, BART, Marian, Whisper) are called with their encoder's inputs and
  `decoder_input_ids` of about half the text's length, in every cell; they are compiled for such
  whole calls, and their note says that `generate` is for decoder-only LMs.

Recurrent models whose transformers code loops in Python are not in the matrix, as their step
takes a bounded number of tokens and a longer prompt runs in pieces (`tests/test_recurrent.py`):
gated DeltaNet (Qwen3-Next, Qwen3.5) loops over chunks of 64 tokens, so its step takes one chunk
(a trace takes minutes); Mamba, Falcon-Mamba and Jamba loop over single tokens and read their
state only on a one-token call, so their step takes one token. RecurrentGemma keeps a cache of
its own: it is traced without it, at the example's length, and a note says so. See the
README's "Hybrid and state-space models".

Written by `python scripts/models_table.py`; `tests/test_families.py` runs the same matrix in CI.
"""


def table(results: dict[str, dict]) -> str:
    head = "| family | model class | " + " | ".join(CELLS) + " |"
    rows = [head, "|" + "---|" * (len(CELLS) + 2)]
    for name, cells in results.items():
        marks = [cells[c].mark().replace("|", "\\|") for c in CELLS]
        rows.append(f"| {name} | `{FAMILIES[name].model}` | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="families to run (default: all, and write docs/models.md)")
    args = parser.parse_args()
    names = args.families or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                     f"known: {', '.join(FAMILIES)}")
    results, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            t = time.perf_counter()
            results[name] = run_family(name, work)
            print(f"{name:16s} {time.perf_counter() - t:5.1f} s  "
                  + "  ".join(f"{c}={results[name][c].status}" for c in CELLS), flush=True)
    text = table(results)
    print(text)
    if not args.families:
        from lowbit.families import BOUNDS

        when = datetime.date.today().isoformat()
        footer = (f"\n\nMeasured {when}: torch {torch.__version__}, transformers {transformers.__version__}; "
                  f"{len(names)} families in {time.perf_counter() - start:.0f} s.\n")
        atomic_write_text(DOC, INTRO.format(**BOUNDS) + "\n" + text + footer)
        print(f"wrote {DOC}")
    return 1 if any(c.status == "fail" for cells in results.values() for c in cells.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
