"""What ONNX Runtime actually does with an exported model: load it, keep the graph after
ONNX Runtime's own optimizations, and count the quantized linears it fused into integer
kernels against those left as DequantizeLinear → float MatMul.

    report = fusion_report("out/model.onnx", weights.layers)
    print(report.text())
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

INTEGER_KERNELS = {"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                   "MatMulNBits", "QGemm", "DynamicQuantizeLinear", "QAttention"}
FLOAT_MATMULS = {"MatMul", "Gemm", "FusedMatMul"}


@dataclass
class FusionReport:
    provider: str
    fused: dict[str, str] = field(default_factory=dict)    # layer → integer kernel
    unfused: dict[str, str] = field(default_factory=dict)  # layer → float op it stayed
    ops: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return len(self.fused) + len(self.unfused)

    def text(self) -> str:
        kernels = Counter(self.fused.values())
        lines = [f"{self.provider}: {len(self.fused)} of {self.total} quantized linears run as integer "
                 f"kernels ({', '.join(f'{k} ×{v}' for k, v in sorted(kernels.items())) or 'none'})"]
        for layer, op in sorted(self.unfused.items()):
            lines.append(f"  warning: {layer} stays DequantizeLinear → {op} in float (not fused)")
        return "\n".join(lines)


def optimized_graph(path: str | Path, provider: str = "CPUExecutionProvider") -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.log_severity_level = 3  # its note on serializing an optimized graph is for it alone
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=[provider])
        return onnx.load(str(out))


def fusion_report(path: str | Path, layers: dict[str, str], provider: str = "CPUExecutionProvider") -> FusionReport:
    """``layers`` maps each quantized weight initializer to its layer (``ExportedWeights.layers``)."""
    model = optimized_graph(path, provider)
    report = FusionReport(provider, ops=Counter(n.op_type for n in model.graph.node))
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        for name in node.input:
            layer = _layer_of(name, layers) or _layer_of(_through_dq(name, producers), layers)
            if layer is None:
                continue
            if node.op_type in INTEGER_KERNELS:
                report.fused[layer] = node.op_type
            elif node.op_type == "DequantizeLinear":
                consumer = _consumer(node, model)
                if consumer is not None and consumer.op_type in INTEGER_KERNELS:
                    report.fused[layer] = consumer.op_type
                elif layer not in report.fused:
                    report.unfused[layer] = consumer.op_type if consumer is not None else "?"
    for layer in report.fused:
        report.unfused.pop(layer, None)
    return report


def _layer_of(name: str | None, layers: dict[str, str]) -> str | None:
    """The layer an initializer belongs to; ONNX Runtime renames what it repacks
    (``<name>_T`` for MatMulNBits), so a name that extends a known one counts too."""
    if not name:
        return None
    if name in layers:
        return layers[name]
    matches = [k for k in layers if name.startswith(k + "_")]
    return layers[max(matches, key=len)] if matches else None


def _through_dq(name: str, producers: dict) -> str | None:
    node = producers.get(name)
    return node.input[0] if node is not None and node.op_type == "DequantizeLinear" else None


def _consumer(node: onnx.NodeProto, model: onnx.ModelProto) -> onnx.NodeProto | None:
    out = node.output[0]
    for n in model.graph.node:
        if out in n.input:
            return n
    return None
