"""The reference interpreter: runs a graph by calling each op's torch reference.

``Executor`` compiles the graph once into a flat plan (function, operand slots, attributes,
result slots, slots to free), so running it costs little more than the torch calls themselves.

    outputs = run_graph(graph, [x])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.ir.attrs import CallArgs, on_device, within
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
    constants: tuple[tuple[int, str], ...]  # constant operands: (slot, name), read if not yet in env
    pinned: tuple[tuple[int, object], ...] = ()  # (operand index, value) given instead of the slot


class ExecutionError(LowbitError):
    pass


class Executor:
    """A graph compiled for repeated runs. ``constants`` overrides the graph's tensors by name
    (the torch backend passes its registered buffers so that ``.to(device)`` works);
    ``override`` may give, per node, another function to call instead of the op's reference.

    A constant is read at its first use and dropped after its last (a constant held in a file
    is then in memory only while it is needed). ``keep_outputs=False`` drops the graph's
    outputs too once no node reads them (calibration wants statistics, not outputs).

    ``start`` + ``advance`` run the steps in pieces, so that many inputs can be taken through
    the graph together, one stretch of steps (a decoder block) at a time."""

    def __init__(self, graph: Graph, constants: Mapping[str, torch.Tensor] | None = None,
                 override: Callable[[Node], tuple[Callable[..., object], dict] | None] | None = None,
                 keep_outputs: bool = True):
        self.graph = graph
        self.override = override  # a backend's own function for some nodes (export, kernels)
        self.version = graph.version
        slot: dict[int, int] = {id(v): i for i, v in enumerate(graph.inputs)}
        self.n_inputs = len(graph.inputs)
        self.const_names: dict[int, str] = {}
        nodes = list(graph.nodes)
        for node in nodes:
            for r in node.results:
                slot[id(r)] = len(slot)
            if node.op == "core.constant":
                self.const_names[slot[id(node.result)]] = str(node.attrs["name"])
        self.n_slots = len(slot)
        self.slot = slot
        self.output_slots = tuple(slot[id(v)] for v in graph.outputs)
        self.constants = constants if constants is not None else graph.tensors
        self.steps = self._plan([n for n in nodes if n.op != "core.constant"], slot, keep_outputs)
        self._index = {id(step.node): i for i, step in enumerate(self.steps)}

    def _plan(self, nodes: list[Node], slot: dict[int, int], keep_outputs: bool) -> list[_Step]:
        keep = set(self.output_slots) if keep_outputs else set()
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
            fn, kwargs = (self.override(node) if self.override else None) or node_callable(node)
            results = tuple(slot[id(r)] for r in node.results)
            unused = tuple(s for s in results if s not in last_use and s not in keep)
            operands = tuple(-1 if v is None else slot[id(v)] for v in node.operands)
            steps.append(_Step(node, fn, operands, kwargs, results, tuple(frees.get(i, ())) + unused,
                               tuple((s, self.const_names[s]) for s in operands if s in self.const_names)))
        return steps

    def step_index(self, node: Node) -> int:
        """Where ``node`` runs: steps before it are ``range(step_index(node))``."""
        return self._index[id(node)]

    def pin(self, node: Node, index: int, value: object) -> None:
        """Run ``node`` with ``value`` as its operand ``index`` from now on (a weight rounded
        while a calibration sweep is under way); the slot it read is no longer read there."""
        i = self._index[id(node)]
        step = self.steps[i]
        pinned = tuple(p for p in step.pinned if p[0] != index) + ((index, value),)
        reads = {s for k, s in enumerate(step.operands) if k not in dict(pinned)}
        self.steps[i] = dataclasses.replace(step, pinned=pinned,
                                            constants=tuple(c for c in step.constants if c[0] in reads))

    def start(self, inputs: Sequence[object]) -> list[object]:
        """A fresh environment (one slot per value) holding ``inputs``."""
        if len(inputs) != self.n_inputs:
            raise ExecutionError(f"graph takes {self.n_inputs} inputs, got {len(inputs)}")
        env: list[object] = [None] * self.n_slots
        env[: self.n_inputs] = inputs
        return env

    def advance(self, env: list[object], begin: int, end: int, hook: NodeHook | None = None,
                constants: Mapping[str, object] | None = None) -> None:
        """Run steps ``begin`` to ``end`` (exclusive) in ``env``; constants from ``constants``
        (default: the executor's) where they are not yet in ``env``."""
        source = self.constants if constants is None else constants
        for step in self.steps[begin:end]:
            for s, name in step.constants:
                if env[s] is None:
                    env[s] = source[name]
            args = [None if s < 0 else env[s] for s in step.operands]
            for index, value in step.pinned:
                args[index] = value
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

    def outputs(self, env: list[object]) -> list[object]:
        for s in self.output_slots:  # a constant that is an output, read by no node
            if env[s] is None and s in self.const_names:
                env[s] = self.constants[self.const_names[s]]
        return [env[s] for s in self.output_slots]

    def run(self, inputs: Sequence[object], hook: NodeHook | None = None) -> list[object]:
        env = self.start(inputs)
        self.advance(env, 0, len(self.steps), hook)
        return self.outputs(env)


def node_callable(node: Node, device: str | None = None, limit: float | None = None
                  ) -> tuple[Callable[..., object], dict]:
    """The reference function of ``node`` and the keyword attributes to call it with. For an
    opaque call, ``device``: where the tensors it creates go, instead of the traced device;
    ``limit``: the largest magnitude its float literals may have (``attrs.within``)."""
    opdef = lookup(node.op)
    if is_opaque(node.op):
        call = node.attrs["args"]
        assert isinstance(call, CallArgs)
        if device is not None:
            call = on_device(call, device)
        if limit is not None:
            call = within(call, limit)
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
