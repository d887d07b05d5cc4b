"""The pass manager: runs a pipeline and records, per pass, its time, node count, parameter
bytes and numeric drift against the original model; verifies after each pass; dumps the
printed graph after each pass to numbered files; names the pass that failed and writes the
graph it failed on.

    records = PassManager(parse_pipeline("canonicalize"), dump_dir="out/").run(graph)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import PassError, VerifyError
from lowbit.io import atomic_write_text
from lowbit.ir.graph import Graph
from lowbit.ir.interpreter import Executor
from lowbit.ir.printer import print_graph
from lowbit.ir.verify import verify
from lowbit.passes.base import Pass, PassContext

LOSSLESS_RTOL = 1e-4


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    nodes: int
    param_bytes: int
    drift: float | None  # relative L2 error of the outputs vs the original graph
    dump: str | None = None


def relative_error(outputs: Sequence[object], reference: Sequence[object]) -> float:
    """Largest ‖y − y₀‖ / ‖y₀‖ over the float tensor outputs."""
    worst = 0.0
    for y, y0 in zip(outputs, reference):
        if isinstance(y0, torch.Tensor) and y0.is_floating_point():
            y = y.to(torch.float64)
            y0 = y0.to(torch.float64)
            denom = y0.norm().item() or 1.0
            worst = max(worst, (y - y0).norm().item() / denom)
    return worst


class PassManager:
    """Runs passes in order. ``sample_inputs`` enables drift measurement and the numeric check
    that lossless passes keep the function (to ``LOSSLESS_RTOL``)."""

    def __init__(self, passes: Sequence[Pass], *, verify_each: bool = True,
                 dump_dir: str | os.PathLike | None = None, sample_inputs: list | None = None,
                 check_lossless: bool = True, ctx: PassContext | None = None,
                 observer: Callable[[int, PassRecord, Graph], None] | None = None,
                 compared_outputs: int | None = None):
        self.passes = list(passes)
        self.observer = observer  # called after the input and after each pass (reports)
        self.verify_each = verify_each
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.sample_inputs = sample_inputs
        self.check_lossless = check_lossless
        self.ctx = ctx or PassContext(example_inputs=sample_inputs)
        # the leading outputs drift is measured on (a decode step: its logits; how its cache is
        # held, rotated or quantized, is the graph's own business)
        self.compared_outputs = compared_outputs

    def _outputs(self, graph: Graph) -> list[object] | None:
        if self.sample_inputs is None:
            return None
        with torch.no_grad():
            return Executor(graph).run(self.sample_inputs)[:self.compared_outputs]

    def _dump(self, graph: Graph, index: int, name: str, suffix: str = "") -> str | None:
        if self.dump_dir is None:
            return None
        path = self.dump_dir / f"{index:02d}-{name}{suffix}.ir"
        atomic_write_text(path, print_graph(graph))
        return str(path)

    def run(self, graph: Graph) -> list[PassRecord]:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        if self.verify_each:
            verify(graph)
        reference = self._outputs(graph)
        previous = reference
        records = [PassRecord("input", 0.0, False, len(graph), graph.param_bytes(),
                              0.0 if reference is not None else None, self._dump(graph, 0, "input"))]
        if self.observer is not None:
            self.observer(0, records[0], graph)
        for i, p in enumerate(self.passes, start=1):
            start = time.perf_counter()
            try:
                changed = p.run(graph, self.ctx)
                if self.verify_each:
                    verify(graph)
            except Exception as e:
                self._fail(graph, i, p, e)
            seconds = time.perf_counter() - start
            outputs = self._outputs(graph) if changed else previous
            drift = relative_error(outputs, reference) if outputs is not None else None
            if changed and p.lossless and self.check_lossless and outputs is not None:
                step = relative_error(outputs, previous)
                if step > LOSSLESS_RTOL:
                    self._fail(graph, i, p, VerifyError(
                        f"lossless pass changed the outputs by {step:.2e} (relative) > {LOSSLESS_RTOL:g}"))
            previous = outputs
            records.append(PassRecord(str(p), seconds, changed, len(graph), graph.param_bytes(),
                                      drift, self._dump(graph, i, p.name)))
            if self.observer is not None:
                self.observer(i, records[-1], graph)
        return records

    def _fail(self, graph: Graph, index: int, p: Pass, error: Exception) -> None:
        dump = self.dump_dir
        if dump is None:
            import tempfile

            dump = Path(tempfile.mkdtemp(prefix="lowbit-failed-"))
        try:
            path = self._dump_to(dump, graph, index, p.name)
            where = f"; the graph it failed on is in {path}"
        except Exception:  # a graph broken badly enough not to print
            where = ""
        raise PassError(f"pass {p} failed: {error}{where}") from error

    @staticmethod
    def _dump_to(folder: Path, graph: Graph, index: int, name: str) -> str:
        path = folder / f"{index:02d}-{name}.failed.ir"
        atomic_write_text(path, print_graph(graph))
        return str(path)


def run_pipeline(graph: Graph, pipeline: str | Sequence[Pass], **options) -> list[PassRecord]:
    """Parse ``pipeline`` (a string or passes) and run it on ``graph`` with ``PassManager``."""
    from lowbit.passes.pipeline import parse_pipeline

    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    return PassManager(passes, **options).run(graph)
