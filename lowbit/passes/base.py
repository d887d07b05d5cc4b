"""Pass base class and registry.

A pass is a frozen dataclass: its fields are its options (typed, with defaults), ``name`` is
what pipelines call it, ``run(graph, ctx)`` edits the graph in place and returns whether it
changed anything. ``lossless`` passes must keep the graph's function; the pass manager checks
that numerically when it has sample inputs.

    @register
    @dataclass(frozen=True)
    class EliminateDeadCode(Pass):
        name: ClassVar[str] = "eliminate-dead-code"
        def run(self, graph, ctx): ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from lowbit.ir.graph import Graph


@dataclass
class PassContext:
    """What passes may need beyond the graph: sample inputs, a seed, a log of notes."""

    example_inputs: list | None = None
    calibration: list[list] | None = None  # batches, each already flattened to graph inputs
    seed: int = 0
    progress: bool = True
    notes: list[str] = field(default_factory=list)
    work_dir: str | None = None  # where long calibration sweeps save their state, to resume

    def note(self, text: str) -> None:
        self.notes.append(text)

    def require_calibration(self, pass_name: str) -> list[list]:
        if not self.calibration:
            from lowbit.errors import LowbitError

            raise LowbitError(f"{pass_name} needs calibration data: pass calibration=[batches] "
                              "to lowbit.compile (or --calibration to the CLI)")
        return self.calibration


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True  # a second run changes nothing
    summary: ClassVar[str] = ""

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        raise NotImplementedError

    def options(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        """The pass as a pipeline item, with the options that differ from their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        opts = {k: v for k, v in self.options().items() if v != defaults[k]}
        if not opts:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "}"


PASSES: dict[str, type[Pass]] = {}
ALIASES: dict[str, str] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in PASSES or cls.name in ALIASES:
        raise ValueError(f"pass {cls.name} is registered twice")
    PASSES[cls.name] = cls
    return cls


def register_alias(name: str, pipeline: str) -> None:
    """A name that expands to a pipeline (``canonicalize`` → its cleanup passes)."""
    if name in PASSES or name in ALIASES:
        raise ValueError(f"pass {name} is registered twice")
    ALIASES[name] = pipeline
