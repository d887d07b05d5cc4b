"""The reference interpreter: runs a graph by calling each op's torch reference.

``Executor`` compiles the graph once into a flat plan (function, operand slots, attributes,
result slots, slots to free), so running it costs little more than the torch calls themselves.

    outputs = run_graph(graph, [x])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.ir.attrs import CallArgs
from lowbit.ir.graph import Graph, Node
from lowbit.ir.opdef import is_opaque, lookup, resolve_target

NodeHook = Callable[[Node, tuple], None]


@dataclass(frozen=True)
class _Step:
    node: Node
    fn: Callable[..., object]
    operands: tuple[int, ...]  # slot per operand, -1 for an absent one
    kwargs: dict
    results: tuple[int, ...]
    free: tuple[int, ...]


class ExecutionError(LowbitError):
    pass


class Executor:
    """A graph compiled for repeated runs. ``constants`` overrides the graph's tensors by name
    (the torch backend passes its registered buffers so that ``.to(device)`` works);
    ``override`` may give, per node, another function to call instead of the op's reference."""

    def __init__(self, graph: Graph, constants: Mapping[str, torch.Tensor] | None = None,
                 override: Callable[[Node], tuple[Callable[..., object], dict] | None] | None = None):
        self.graph = graph
        self.override = override  # a backend's own function for some nodes (export, kernels)
        self.version = graph.version
        slot: dict[int, int] = {id(v): i for i, v in enumerate(graph.inputs)}
        self.n_inputs = len(graph.inputs)
        self.const_slots: list[tuple[int, str]] = []
        nodes = list(graph.nodes)
        for node in nodes:
            for r in node.results:
                slot[id(r)] = len(slot)
            if node.op == "core.constant":
                self.const_slots.append((slot[id(node.result)], str(node.attrs["name"])))
        self.n_slots = len(slot)
        self.output_slots = tuple(slot[id(v)] for v in graph.outputs)
        self.constants = constants if constants is not None else graph.tensors
        self.steps = self._plan(nodes, slot)

    def _plan(self, nodes: list[Node], slot: dict[int, int]) -> list[_Step]:
        keep = set(self.output_slots) | {s for s, _ in self.const_slots}
        last_use: dict[int, int] = {}
        for i, node in enumerate(nodes):
            for v in node.operands:
                if v is not None:
                    last_use[slot[id(v)]] = i
        frees: dict[int, list[int]] = {}
        for s, i in last_use.items():
            if s not in keep:
                frees.setdefault(i, []).append(s)
        steps = []
        for i, node in enumerate(nodes):
            if node.op == "core.constant":
                continue
            fn, kwargs = (self.override(node) if self.override else None) or node_callable(node)
            steps.append(_Step(node, fn, tuple(-1 if v is None else slot[id(v)] for v in node.operands),
                               kwargs, tuple(slot[id(r)] for r in node.results),
                               tuple(frees.get(i, ()))))
        return steps

    def run(self, inputs: Sequence[object], hook: NodeHook | None = None) -> list[object]:
        if len(inputs) != self.n_inputs:
            raise ExecutionError(f"graph takes {self.n_inputs} inputs, got {len(inputs)}")
        env: list[object] = [None] * self.n_slots
        env[: self.n_inputs] = inputs
        for s, name in self.const_slots:
            env[s] = self.constants[name]
        for step in self.steps:
            args = [None if s < 0 else env[s] for s in step.operands]
            try:
                out = step.fn(*args, **step.kwargs)
            except Exception as e:
                loc = f" at {step.node.loc.module}" if step.node.loc.module else ""
                raise ExecutionError(f"{step.node.op} (%{step.node.results[0].name}){loc} failed: {e}") from e
            if len(step.results) == 1:
                env[step.results[0]] = out
            else:
                for s, o in zip(step.results, out):  # type: ignore[call-overload]
                    env[s] = o
            if hook is not None:
                hook(step.node, tuple(env[s] for s in step.results))
            for s in step.free:
                env[s] = None
        return [env[s] for s in self.output_slots]


def node_callable(node: Node) -> tuple[Callable[..., object], dict]:
    """The reference function of ``node`` and the keyword attributes to call it with."""
    opdef = lookup(node.op)
    if is_opaque(node.op):
        call = node.attrs["args"]
        assert isinstance(call, CallArgs)
        return functools.partial(opdef.reference, __target__=resolve_target(node.op), args=call), {}
    return opdef.reference, opdef.full_attrs(node.attrs)


def run_graph(graph: Graph, inputs: Sequence[object], hook: NodeHook | None = None) -> list[object]:
    """Run ``graph`` once on ``inputs`` (tensors or ints, in graph-input order)."""
    with torch.no_grad():
        return Executor(graph).run(inputs, hook)


def capture_values(graph: Graph, inputs: Sequence[object], values) -> dict[int, object]:
    """Run ``graph`` on ``inputs`` and return what each of ``values`` (graph inputs or node
    results) held, keyed by ``id(value)``."""
    wanted = {id(v) for v in values}
    seen = {id(v): x for v, x in zip(graph.inputs, inputs) if id(v) in wanted}

    def hook(node: Node, results: tuple) -> None:
        for r, x in zip(node.results, results):
            if id(r) in wanted:
                seen[id(r)] = x

    run_graph(graph, inputs, hook)
    return seen
