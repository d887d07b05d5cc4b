"""The GPU benchmarks' acceptance figures, computed from their result tables (the CSV files).

Each figure names its table, the rows it takes, the number per row, how the rows reduce to one
figure and its goal. Speed-ups reduce to their worst case (the smallest over the shapes a goal
covers, since a goal such as "≥ 1.5× at M ≥ 512" is a claim about every such shape); time
ratios and errors to their largest. The median over the same rows is kept beside it. The
benchmarks print these lines; ``scripts/gpu_check.py`` puts them in its summary with PASS/FAIL.

Plain Python, so reading the tables needs neither torch nor a GPU::

    tables = read_tables(Path("bench-kernels"))
    for m in measure_all(tables):
        print(describe(m, smoke=False))
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Row = dict[str, object]


@dataclass(frozen=True)
class Figure:
    """One acceptance figure: ``statistic`` over ``value(row)`` for the rows ``keep`` takes."""

    name: str
    table: str
    keep: Callable[[Row], bool]
    value: Callable[[Row], float]
    goal: float
    at_most: bool = False  # the goal is an upper bound (a time ratio, an error)

    @property
    def statistic(self) -> str:
        return "max" if self.at_most else "min"


@dataclass(frozen=True)
class Measured:
    """A figure's worst case and median over ``n`` rows (``value`` None: no rows)."""

    figure: Figure
    value: float | None
    median: float | None
    n: int

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.figure.goal if self.figure.at_most else self.value >= self.figure.goal

    def goal_text(self) -> str:
        return f"{'≤' if self.figure.at_most else '≥'} {self.figure.goal:g}"

    def value_text(self) -> str:
        """The figure and what it is over: ``2.31 (worst of 12, median 2.60)``."""
        if self.value is None:
            return "no rows"
        if self.n == 1:
            return f"{self.value:.3g} (one measurement)"
        return f"{self.value:.3g} (worst of {self.n}, median {self.median:.3g})"


def _kernel(name: str, keep_m: Callable[[int], bool]) -> Callable[[Row], bool]:
    return lambda r: r["kernel"] == name and keep_m(int(r["M"]))


def _sparse(target: float, min_seq: int = 0) -> Callable[[Row], bool]:
    return lambda r: float(r["target"]) == target and int(r["seq"]) >= min_seq


def _e2e(recipes: tuple[str, ...], batch: int, seq: int) -> Callable[[Row], bool]:
    return lambda r: r["recipe"] in recipes and int(r["batch"]) == batch and int(r["seq"]) == seq


def _column(name: str) -> Callable[[Row], float]:
    return lambda r: float(r[name])


def _time_vs_sdpa(r: Row) -> float:
    """Block-sparse time (mask building included) over SDPA's."""
    return 1.0 / float(r["speedup"])


FIGURES: tuple[Figure, ...] = (
    Figure("W8A8 scaled_mm vs cuBLAS fp16, M ≥ 512, 7B/8B shapes", "kernels",
           _kernel("W8A8 scaled_mm", lambda m: m >= 512), _column("ratio"), 1.5),
    Figure("W4A16 w4a16_mm vs fp16, M ≤ 16", "kernels",
           _kernel("W4A16 g128", lambda m: m <= 16), _column("ratio"), 3.0),
    Figure("W4A16 w4a16_mm vs fp16, M ≥ 256", "kernels",
           _kernel("W4A16 g128", lambda m: m >= 256), _column("ratio"), 0.8),
    Figure("FP8 scaled_mm vs bf16, M ≥ 2048", "kernels",
           _kernel("FP8 scaled_mm (vs bf16)", lambda m: m >= 2048), _column("ratio"), 1.5),
    Figure("fused Hadamard + per-token int8 quantize, time / plain copy", "hadamard",
           lambda r: True, _column("time_vs_copy"), 1.3, at_most=True),
    Figure("block-sparse attention at 90%, ≥ 16k tokens, vs SDPA, mask building included",
           "sparse_attention", _sparse(0.9, 16384), _column("speedup"), 5.0),
    Figure("block-sparse attention at 0%, time / SDPA, mask building included", "sparse_attention",
           _sparse(0.0), _time_vs_sdpa, 1.3, at_most=True),
    Figure("block-sparse attention at 0%, max |error| vs SDPA", "sparse_attention",
           _sparse(0.0), _column("max_abs_err"), 2e-3, at_most=True),
    Figure("end to end: w4a16 decode of 1 token vs fp16 eager", "e2e",
           _e2e(("w4a16", "w4a16-rtn"), 1, 1), _column("vs fp16 eager"), 2.0),
    Figure("end to end: w8a8 prefill of 2048 tokens vs fp16 eager", "e2e",
           _e2e(("w8a8",), 1, 2048), _column("vs fp16 eager"), 1.3),
)


def measure(figure: Figure, rows: list[Row]) -> Measured:
    """The figure over the rows of its table that it keeps."""
    values = [figure.value(r) for r in rows if figure.keep(r)]
    if not values:
        return Measured(figure, None, None, 0)
    worst = max(values) if figure.at_most else min(values)
    return Measured(figure, worst, statistics.median(values), len(values))


def measure_all(tables: dict[str, list[Row]]) -> list[Measured]:
    """Every figure whose table is in ``tables``, in the order of :data:`FIGURES`."""
    return [measure(f, tables[f.table]) for f in FIGURES if f.table in tables]


def describe(m: Measured, smoke: bool) -> str:
    """One printed line: the figure, the measured value, the goal and whether it is met."""
    if smoke:
        verdict = "not measured (smoke run: no speed figures)"
    else:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[m.met]
    return f"{m.figure.name}: {m.value_text()}, goal {m.goal_text()}: {verdict}"


def read_table(path: Path) -> list[Row]:
    """A CSV written by ``_gpu.write_table``, numbers parsed back."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_tables(folder: Path, names: tuple[str, ...] | None = None) -> dict[str, list[Row]]:
    """The tables named (default: every figure's) that exist in ``folder``."""
    names = names or tuple(dict.fromkeys(f.table for f in FIGURES))
    return {n: read_table(folder / f"{n}.csv") for n in names if (folder / f"{n}.csv").exists()}


def print_figures(folder: Path, names: tuple[str, ...], smoke: bool) -> None:
    """Print the acceptance lines of the tables ``names`` just written to ``folder``."""
    for m in measure_all(read_tables(folder, names)):
        print(describe(m, smoke))


def _number(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
