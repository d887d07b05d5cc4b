"""Streaming calibration: run the graph over a calibration set and update ``TensorStats`` at
chosen values. Nothing is stored per batch; a progress bar shows the batches.

    stats = calibrate(graph, batches, [linear.operand(0) for linear in linears])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

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


class _AllSeen(Exception):
    """Raised by the hook once every wanted value of a batch is observed: the rest of the graph
    need not run."""


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...


class HessianStats:
    """H = Σ xᵀx over all rows of the last dim (GPTQ's proxy Hessian), and the row count."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        self.h = x2.T @ x2 if self.h is None else self.h + x2.T @ x2
        self.rows += x2.shape[0]


class RowSample:
    """The first ``max_rows`` rows (tokens) seen, spread over batches: AWQ's search sample."""

    def __init__(self, max_rows: int = 512, per_batch: int = 64) -> None:
        self.max_rows, self.per_batch = max_rows, per_batch
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if self.count >= self.max_rows:
            return
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        step = max(1, x2.shape[0] // self.per_batch)
        take = x2[::step][: min(self.per_batch, self.max_rows - self.count)]
        self.rows.append(take.clone())
        self.count += take.shape[0]

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.rows)


def calibrate(graph: Graph, batches: Iterable[Sequence[object]], values: Sequence[Value],
              flatten: Callable[[Sequence[object]], list] | None = None,
              progress: bool = True, desc: str = "calibrating",
              observer: Callable[[], Observer] = TensorStats) -> dict[str, Any]:
    """Statistics of ``values`` (by value name) over ``batches``: one ``observer()`` each
    (``TensorStats`` by default; ``HessianStats`` or ``RowSample`` for weight rounding).

    ``flatten`` turns one batch (the model's argument tuple) into the graph's inputs. A batch
    with NaN/Inf, or a node producing them, is an error naming the batch and the node.
    """
    wanted = {id(v): v.name for v in values}
    stats = {name: observer() for name in wanted.values()}
    executor = Executor(graph)
    batch_no = 0

    inner = {id(v) for v in values} - {id(v) for v in graph.inputs}
    remaining: set[int] = set()

    def hook(node: Node, outputs: tuple) -> None:
        for r, out in zip(node.results, outputs):
            name = wanted.get(id(r))
            if name is not None:
                where = f"%{r.name} ({node.op}{' at ' + node.loc.module if node.loc.module else ''})"
                _check_finite(out, where, batch_no)
                stats[name].update(out)
                remaining.discard(id(r))
                if not remaining:
                    raise _AllSeen

    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    seen = 0
    with torch.no_grad():
        for batch_no, batch in enumerate(tqdm(batches, desc=desc, total=total, disable=not progress,
                                              unit="batch", leave=False)):
            seen += 1
            inputs = flatten(batch) if flatten is not None else list(batch)
            for v, x in zip(graph.inputs, inputs):
                _check_finite(x, f"input %{v.name}", batch_no)
                if id(v) in wanted:
                    stats[v.name].update(x)
            remaining.update(inner)
            if remaining:
                try:
                    executor.run(inputs, hook)
                except _AllSeen:
                    pass
    if seen == 0 and values:
        raise CalibrationError("the calibration set is empty")
    return stats
