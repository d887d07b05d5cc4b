"""Silence what tracing and exporting print that a user can do nothing about: FutureWarnings
and DeprecationWarnings from torch and transformers internals, torch.export's notes on dims it
specialized, and the ONNX exporter's "torchvision is not installed" lines."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_LOGGERS = ("torch._export", "torch.export", "torch.onnx", "torch.fx.experimental.symbolic_shapes",
            "torch._dynamo", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Within: no FutureWarning/DeprecationWarning, and torch's export loggers only at ERROR."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
