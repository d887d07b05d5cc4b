"""The ONNX backend: IR → ONNX that ONNX Runtime runs with integer kernels, a report of what
it fused, and validation against the torch backend."""

from lowbit.backends.onnx.export import ExportedWeights, build_onnx, export_onnx
from lowbit.backends.onnx.report import FusionReport, fusion_report
from lowbit.backends.onnx.validate import compare_with_torch

__all__ = ["ExportedWeights", "FusionReport", "build_onnx", "compare_with_torch", "export_onnx",
           "fusion_report"]
