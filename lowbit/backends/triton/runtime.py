"""When the Triton kernels run, and with which tile configuration.

A kernel runs when Triton is importable and its input is on a CUDA device, or on the CPU with
``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests). Otherwise each op's torch
reference runs, so a triton-backend module works everywhere. ``LOWBIT_TRITON=reference``
forces the references (to compare against them on a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, slowly and exactly)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` should launch its Triton kernel rather than its torch reference."""
    if os.environ.get("LOWBIT_TRITON", "") == "reference" or not triton_available():
        return False
    if t.is_cuda:
        return True
    return interpreting() and t.device.type == "cpu"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
