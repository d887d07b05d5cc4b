"""The torch backend: IR → ``torch.nn.Module`` that runs the graph with the reference ops."""

from lowbit.backends.torch.module import CompiledModule

__all__ = ["CompiledModule"]
