"""Streaming calibration: run the graph over a calibration set and update ``TensorStats`` at
chosen values. Nothing is stored per batch; a progress bar shows the batches.

    stats = calibrate(graph, batches, [linear.operand(0) for linear in linears])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.interpreter import Executor
from lowbit.quant.observers import TensorStats


class CalibrationError(LowbitError):
    pass


def _check_finite(t: object, what: str, batch: int) -> None:
    if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
        raise CalibrationError(f"calibration batch {batch}: {what} holds NaN or Inf")


def calibrate(graph: Graph, batches: Iterable[Sequence[object]], values: Sequence[Value],
              flatten: Callable[[Sequence[object]], list] | None = None,
              progress: bool = True, desc: str = "calibrating") -> dict[str, TensorStats]:
    """Statistics of ``values`` (by value name) over ``batches``.

    ``flatten`` turns one batch (the model's argument tuple) into the graph's inputs. A batch
    with NaN/Inf, or a node producing them, is an error naming the batch and the node.
    """
    wanted = {id(v): v.name for v in values}
    stats = {name: TensorStats() for name in wanted.values()}
    executor = Executor(graph)
    batch_no = 0

    def hook(node: Node, outputs: tuple) -> None:
        for r, out in zip(node.results, outputs):
            name = wanted.get(id(r))
            if name is not None:
                where = f"%{r.name} ({node.op}{' at ' + node.loc.module if node.loc.module else ''})"
                _check_finite(out, where, batch_no)
                stats[name].update(out)

    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    with torch.no_grad():
        for batch_no, batch in enumerate(tqdm(batches, desc=desc, total=total, disable=not progress,
                                              unit="batch", leave=False)):
            inputs = flatten(batch) if flatten is not None else list(batch)
            for v, x in zip(graph.inputs, inputs):
                _check_finite(x, f"input %{v.name}", batch_no)
                if id(v) in wanted:
                    stats[v.name].update(x)
            executor.run(inputs, hook)
    if batch_no == 0 and not any(s.batches for s in stats.values()) and values:
        raise CalibrationError("the calibration set is empty")
    return stats
