"""The frontend: PyTorch model → lowbit IR (the only package that imports torch.export)."""

from torch.export import Dim

from lowbit.frontend.trace import TracedModel, trace

__all__ = ["Dim", "TracedModel", "trace"]
