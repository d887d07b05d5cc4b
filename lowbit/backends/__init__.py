"""Backends consume verified IR: ``torch`` (runs anywhere), ``triton`` (CUDA kernels),
``onnx`` (ONNX Runtime)."""
