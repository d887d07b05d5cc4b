"""The triton backend: the torch backend's module with quantized linears, Hadamard rotations
and block-sparse attention running as Triton kernels (torch custom ops ``lowbit::*``) on CUDA.
Each op has a torch reference that runs without CUDA; see ``runtime.use_triton``."""

from lowbit.backends.triton.module import PIPELINE, TritonModule

__all__ = ["PIPELINE", "TritonModule"]
