"""The evaluation protocol every peer runner shares (a copy of lowbit.evaluate's byte_windows and
perplexity, so a peer venv never imports lowbit), and the JSON-lines output of a runner.

Protocol: the text file's bytes cut into non-overlapping 256-byte windows (the remainder dropped),
token id == byte value; perplexity = exp(mean next-token cross-entropy over all windows,
predicting tokens 1..255 of each window from the ones before it, no cache); the KL divergence
from the runner's fp32 model to the quantized one, per predicted token (nats), on the same
windows (``reference`` records the fp32 predictions; every later evaluation is compared to them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

WINDOW = 256
EVAL_BATCH = 16

# every configuration a runner may be asked for (rows of the table)
CONFIGS = ["w4a16", "w8a8-static", "w4a8", "w4a4-token", "w4a4-token-rot", "w4a4-static",
           "w4a4-static-rot"]


def windows(path: str, limit: int | None = None, offset: int = 0):
    """(n, 256) int64 tensor of the file's non-overlapping byte windows (first ``limit`` only),
    cut from byte ``offset`` on (a different draw of calibration windows from the same text)."""
    import torch

    data = open(path, "rb").read()[offset:]
    n = len(data) // WINDOW
    ids = torch.tensor(list(data[: n * WINDOW]), dtype=torch.long).reshape(n, WINDOW)
    return ids if limit is None else ids[:limit]


def batches(ids, batch_size: int = EVAL_BATCH) -> list:
    return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


_REFERENCE: dict = {}  # the fp32 model's next-token log-probabilities, and the last KL measured


def perplexity_from_logits(logit_fn, ids, record: bool = False) -> float:
    """exp(mean cross-entropy of tokens 1..255 given the ones before), summed over all windows.
    ``logit_fn(batch_ids) -> (b, 256, vocab) float tensor``. With ``record`` the predictions
    become the reference; otherwise, once a reference exists for these windows, the KL from
    it is left in ``_REFERENCE["kl"]`` for ``run_method``."""
    import torch

    total, count, kl = 0.0, 0, 0.0
    compare = not record and _REFERENCE.get("ids") is not None and torch.equal(_REFERENCE["ids"], ids)
    logprobs = []
    with torch.no_grad():
        for i, b in enumerate(batches(ids)):
            logits = logit_fn(b)[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     b[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += b[:, 1:].numel()
            if record:
                logprobs.append(torch.log_softmax(logits, -1))
            elif compare:
                ref = _REFERENCE["logprobs"][i]
                kl += float((ref.exp() * (ref - torch.log_softmax(logits, -1))).sum())
    if record:
        _REFERENCE.update(ids=ids, logprobs=logprobs)
    _REFERENCE["kl"] = kl / count if compare else None
    return float(torch.exp(torch.tensor(total / count)))


def perplexity(model, ids, record: bool = False) -> float:
    """Perplexity of a torch causal LM (``model(ids).logits``) under the protocol."""
    return perplexity_from_logits(lambda b: model(b).logits, ids, record)


def reference(model, ids) -> float:
    """The fp32 model's perplexity; its predictions become the reference for the KL column."""
    return perplexity(model, ids, record=True)


def load_model(path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="directory of a LlamaForCausalLM")
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--val", required=True, help="evaluation text file")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate on the first N windows only")
    p.add_argument("--calib-windows", type=int, default=None, help="calibrate on the first N windows only")
    p.add_argument("--calib-offset", type=int, default=0,
                   help="cut the calibration windows from this byte of the file on")
    p.add_argument("--methods", default="",
                   help="comma-separated method names to run (default: every method of a configuration)")
    p.add_argument("--work-dir", default=None, help="scratch directory (exported files)")
    args = p.parse_args()
    args.configs = [c for c in args.configs.split(",") if c]
    _ONLY.update(m for m in args.methods.split(",") if m)
    return args


_ONLY: set[str] = set()  # --methods: run only these (empty: all)


def setup() -> None:
    """One thread (the machine is shared), no network, quiet libraries."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def emit(**row) -> None:
    """One JSON line on stdout: the benchmark driver reads every line holding '{"row"'."""
    sys.stdout.flush()  # a library's progress bar may have left a line open: start a fresh one
    print("\n" + json.dumps({"row": True, **row}), flush=True)


def one_line(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (msg[0] if msg else type(exc).__name__)[:300]


def run_method(config: str, method: str, fn, ref_note: str = "") -> None:
    """Run ``fn() -> ppl`` and emit its row, or an error row with one line of the exception
    (the full traceback goes to stderr). A method left out by ``--methods`` prints nothing."""
    if _ONLY and method not in _ONLY:
        return
    t0 = time.time()
    _REFERENCE["kl"] = None
    try:
        ppl = fn()
        if ppl is None or not math.isfinite(ppl):
            raise RuntimeError(f"perplexity is {ppl}")
        emit(config=config, method=method, ppl=ppl, kl=_REFERENCE.get("kl"), seconds=time.time() - t0,
             note=ref_note)
    except Exception as e:  # noqa: BLE001 -- a failed method is a table cell, not a crash
        traceback.print_exc(file=sys.stderr)
        emit(config=config, method=method, error=one_line(e), seconds=time.time() - t0)


def not_available(config: str, method: str, reason: str) -> None:
    if _ONLY and method not in _ONLY:
        return
    emit(config=config, method=method, na=reason)


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out
