"""lowbit: a compiler for cheap inference.

    import lowbit
    traced = lowbit.trace(model, (input_ids,), dynamic_shapes=({0: "batch", 1: "seq"},))
    print(traced.graph)
    fast = lowbit.compile(model, (input_ids,), pipeline="canonicalize")
    q = lowbit.compile(model, (input_ids,), recipe="w4a16", calibration=batches)
    q.save("out/model-w4a16"); q = lowbit.load("out/model-w4a16")
"""

from lowbit import ir  # noqa: F401
from lowbit.errors import CheckpointError, LowbitError, PassError, PipelineError, TraceError, VerifyError
from lowbit.api import compile
from lowbit.frontend import TracedModel, trace
from lowbit.saving import load

__version__ = "0.1.0"

__all__ = ["CheckpointError", "LowbitError", "PassError", "PipelineError", "TraceError", "TracedModel",
           "VerifyError", "compile", "load", "trace", "__version__"]
