"""lowbit: a compiler for cheap inference.

    import lowbit
    traced = lowbit.trace(model, (input_ids,), dynamic_shapes=({0: "batch", 1: "seq"},))
    print(traced.graph)
    fast = lowbit.compile(model, (input_ids,), pipeline="canonicalize")
"""

from lowbit import ir  # noqa: F401
from lowbit.errors import LowbitError, PassError, PipelineError, TraceError, VerifyError
from lowbit.api import compile
from lowbit.frontend import TracedModel, trace

__version__ = "0.1.0"

__all__ = ["LowbitError", "PassError", "PipelineError", "TraceError", "TracedModel",
           "VerifyError", "compile", "trace", "__version__"]
