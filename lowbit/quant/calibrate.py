"""Streaming calibration: run the graph over a calibration set and update ``TensorStats`` at
chosen values. The batches go through the graph together, one block at a time (``Sweep``), so
each block's weights are read once; nothing but the block-boundary values is kept per batch,
and those go to disk when they are large. A progress bar shows the blocks.

    stats = calibrate(graph, batches, [linear.operand(0) for linear in linears])
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.interpreter import Executor
from lowbit.quant.observers import TensorStats


class CalibrationError(LowbitError):
    pass


# bytes of block-boundary activations held in memory before they go to disk
BOUNDARY_MEMORY = int(float(os.environ.get("LOWBIT_BOUNDARY_MB", "2048")) * 2**20)


def _check_finite(t: object, what: str, batch: int) -> None:
    if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
        raise CalibrationError(f"calibration batch {batch}: {what} holds NaN or Inf")


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...


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


def block_of(module: str) -> str:
    """The repeated block a module path belongs to: the path up to its first numeric part
    (``model.layers.3.mlp.up_proj`` → ``model.layers.3``); the whole path if none."""
    parts = module.split(".")
    i = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[: i + 1])


def block_starts(executor: Executor) -> list[int]:
    """Step indices where a new block (``block_of`` the node's module path) begins; steps without
    a module path belong to the block before them."""
    starts, current = [0], None
    for i, step in enumerate(executor.steps):
        module = step.node.loc.module
        if not module:
            continue
        label = block_of(module)
        if current is not None and label != current and i > 0:
            starts.append(i)
        current = label
    return starts


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it for reuse otherwise), so that
    between blocks the process holds what the sweep holds, not what it once held."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _ReadOnce(Mapping):
    """Constants read at most once while one stretch of steps runs over every batch."""

    def __init__(self, base: Mapping[str, object]):
        self.base, self.cache = base, {}

    def __getitem__(self, name: str) -> object:
        if name not in self.cache:
            self.cache[name] = self.base[name]
        return self.cache[name]

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def _is_mask(v: Value) -> bool:
    """A graph input named ``attention_mask`` or ``…_attention_mask``."""
    return v.name == "attention_mask" or v.name.endswith("_attention_mask")


def padding_mask(graph: Graph, inputs: Sequence[object]) -> torch.Tensor | None:
    """Which tokens of a batch are real: the graph input ``attention_mask`` (or ``…_attention_mask``)
    when it is a [batch, seq] tensor of zeros and ones with at least one zero, as a bool tensor;
    None when the batch has no padding (or no such input)."""
    for v, x in zip(graph.inputs, inputs):
        if not _is_mask(v):
            continue
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.numel() and not torch.is_complex(x):
            real = x != 0
            if bool(((x == 0) | (x == 1)).all()) and not bool(real.all()):
                return real
    return None


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` [batch, seq, ...] without its padding tokens ([tokens, ...]); ``x`` itself when it
    has no padding mask or is not laid out by token."""
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(x.device)]


class Sweep:
    """Every calibration batch taken through the graph together, a stretch of steps at a time:
    each block's weights are read once for all batches, and between stretches only the values
    that cross the boundary are held (in memory, or on disk past ``BOUNDARY_MEMORY``).

        sweep = Sweep(graph, batches)
        sweep.advance(sweep.executor.step_index(node))   # every batch up to ``node``
        xs = sweep.values(v)                              # ``v`` in each batch
        rows = sweep.tokens(v)                            # the same without padding tokens

    Padding (``padding_mask``: a batch's ``attention_mask`` zeros) is read off each batch so
    that statistics leave it out: nothing in the model reads a padded position's values.
    A batch or a node that holds NaN/Inf is an error naming it."""

    def __init__(self, graph: Graph, batches: Iterable[Sequence[object]],
                 flatten: Callable[[Sequence[object]], list] | None = None, spill_dir: str | None = None):
        self.executor = Executor(graph, keep_outputs=False)
        self.graph = graph
        self.pos = 0
        self.envs = _Boundary(spill_dir, set(self.executor.const_names))
        self.masks: list[torch.Tensor | None] = []
        for i, batch in enumerate(batches):
            inputs = flatten(batch) if flatten is not None else list(batch)
            for v, x in zip(graph.inputs, inputs):
                _check_finite(x, f"input %{v.name}", i)
            self.masks.append(padding_mask(graph, inputs))
            self.envs.append(self.executor.start(inputs))
        if not len(self.envs):
            raise CalibrationError("the calibration set is empty")
        if all(m is not None and not bool(m.any()) for m in self.masks):
            name = next(v.name for v in graph.inputs if _is_mask(v))
            raise CalibrationError(f"every calibration batch is all padding ({name} is all zeros): there is no "
                                   "real token to calibrate on; give batches whose mask marks their tokens with 1")

    def advance(self, stop: int, hook: Callable[[int, Node, tuple], None] | None = None) -> None:
        """Run every batch from the current step up to ``stop``; ``hook(batch, node, outputs)``
        sees each node's outputs."""
        if stop <= self.pos:
            return
        consts = _ReadOnce(self.executor.constants)
        for b in range(len(self.envs)):
            env = self.envs.get(b)
            self.executor.advance(env, self.pos, stop, None if hook is None else
                                  (lambda node, out, b=b: hook(b, node, out)), consts)
            self.envs.put(b, env)
        self.pos = stop
        del consts
        release_memory()

    def mark(self) -> tuple[int, list]:
        """The sweep's position and every batch's values there, to ``rewind`` to (a stretch run
        again after its weights changed); the latest mark can be rewound to more than once."""
        return self.pos, self.envs.mark()

    def rewind(self, marked: tuple[int, list]) -> None:
        self.pos, envs = marked
        self.envs.rewind(envs)

    def restore(self, step: int, envs: list[list]) -> None:
        """Continue from a saved position (``SweepCheckpoint``): constants are read again."""
        if len(envs) != len(self.envs) or any(len(env) != self.executor.n_slots for env in envs):
            raise CalibrationError("the saved sweep state does not fit this graph and calibration set")
        for b, env in enumerate(envs):
            self.envs.put(b, env)
        self.pos = step

    def values(self, value: Value) -> Iterator[torch.Tensor]:
        """What ``value`` holds in each batch, one batch at a time (it must have been computed
        and still be read); NaN/Inf is an error naming the batch."""
        s = self.executor.slot[id(value)]
        for b in range(len(self.envs)):
            x = self.envs.value(b, s)
            if x is None:
                raise CalibrationError(f"%{value.name} is not live at step {self.pos}")
            _check_finite(x, f"%{value.name}" + (f" (at {value.producer.loc.module})" if value.producer and
                                                 value.producer.loc.module else ""), b)
            yield x

    def tokens(self, value: Value) -> Iterator[torch.Tensor]:
        """``values(value)`` without the padding tokens of each batch (``real_tokens``); a batch
        that is all padding there is left out."""
        for b, x in enumerate(self.values(value)):
            x = real_tokens(x, self.masks[b])
            if x.numel():
                yield x


def _link(src: str, dst: str) -> None:
    """``dst`` as a second name of file ``src`` (a copy where links are not allowed)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _Boundary:
    """The per-batch environments between stretches of steps. Once one environment's tensors
    times the number of batches exceed ``BOUNDARY_MEMORY`` bytes, each is written to a
    safetensors file in a temporary folder (under ``spill_dir``) between stretches."""

    def __init__(self, spill_dir: str | None, shared: set[int]):
        self.envs: list[list | None] = []
        self.spill_dir = spill_dir
        self.shared = shared  # slots holding constants: shared by all batches, never written out
        self.spilling = False
        self._temp: tempfile.TemporaryDirectory | None = None

    def __len__(self) -> int:
        return len(self.envs)

    def append(self, env: list) -> None:
        self.envs.append(env)

    def _slots(self, env: list) -> list[int]:
        return [i for i, x in enumerate(env) if isinstance(x, torch.Tensor) and i not in self.shared]

    def get(self, b: int) -> list:
        env = self.envs[b]
        if self.spilling and os.path.exists(self._path(b)):
            from safetensors.torch import load_file

            for key, t in load_file(self._path(b)).items():
                env[int(key)] = t
            os.remove(self._path(b))
        return env

    def value(self, b: int, slot: int) -> object:
        """One value of batch ``b``, read from its file if it was written out (the batch stays there)."""
        if self.spilling and os.path.exists(self._path(b)):
            from safetensors import safe_open

            with safe_open(self._path(b), "pt") as f:
                if str(slot) in f.keys():
                    return f.get_tensor(str(slot))
        return self.envs[b][slot]

    def put(self, b: int, env: list) -> None:
        self.envs[b] = env
        if not self.spilling:
            held = sum(env[i].numel() * env[i].element_size() for i in self._slots(env))
            if held * len(self.envs) <= BOUNDARY_MEMORY:
                return
            self.spilling = True
            self._temp = tempfile.TemporaryDirectory(prefix="lowbit-boundary-", dir=self.spill_dir)
            for earlier in range(b):
                self._write(earlier, self.envs[earlier])
        self._write(b, env)

    def mark(self) -> list[tuple[list, str | None]]:
        """Every batch's environment as it stands, to ``rewind`` to: a copy of the list (the
        tensors are shared: steps never write into them), and a second link to its file when
        it is written out."""
        marked = []
        for b, env in enumerate(self.envs):
            kept = None
            if self.spilling and os.path.exists(self._path(b)):
                kept = self._path(b) + ".mark"
                if os.path.exists(kept):
                    os.remove(kept)
                _link(self._path(b), kept)
            marked.append((list(env), kept))
        return marked

    def rewind(self, marked: list[tuple[list, str | None]]) -> None:
        """Back to the environments ``mark`` returned (the latest mark)."""
        for b, (env, kept) in enumerate(marked):
            if self.spilling and os.path.exists(self._path(b)):
                os.remove(self._path(b))
            self.envs[b] = list(env)
            if kept:
                _link(kept, self._path(b))

    def _path(self, b: int) -> str:
        return os.path.join(self._temp.name, f"batch{b}.safetensors") if self._temp else ""

    def _write(self, b: int, env: list) -> None:
        from safetensors.torch import save_file

        slots = self._slots(env)
        save_file({str(i): env[i].contiguous() for i in slots}, self._path(b))
        for i in slots:
            env[i] = None


def calibrate(graph: Graph, batches: Iterable[Sequence[object]], values: Sequence[Value],
              flatten: Callable[[Sequence[object]], list] | None = None,
              progress: bool = True, desc: str = "calibrating",
              observer: Callable[[], Observer] = TensorStats,
              observers: Mapping[str, Observer] | None = None) -> dict[str, Any]:
    """Statistics of ``values`` (by value name) over ``batches``: one ``observer()`` each
    (``TensorStats`` by default; ``RowSample`` for AWQ's search), or the one ``observers``
    gives for its name (one object may watch several values, e.g. rows and their experts).

    ``flatten`` turns one batch (the model's argument tuple) into the graph's inputs. The
    batches go through the graph together, block by block (``Sweep``), and only as far as the
    last wanted value. Padding tokens (``attention_mask`` zeros) are not observed. A batch with
    NaN/Inf, or a node producing them, is an error naming the batch and the node.
    """
    wanted = {id(v): v.name for v in values}
    stats = {name: observers[name] if observers and name in observers else observer()
             for name in wanted.values()}
    if not values:
        return stats
    sweep = Sweep(graph, batches, flatten)
    for v in graph.inputs:
        if id(v) in wanted:
            for x in sweep.tokens(v):
                stats[v.name].update(x)
    producers = [i for i, step in enumerate(sweep.executor.steps) if any(id(r) in wanted for r in step.node.results)]
    if not producers:
        return stats
    last = producers[-1] + 1

    def hook(batch: int, node: Node, outputs: tuple) -> None:
        for r, out in zip(node.results, outputs):
            name = wanted.get(id(r))
            if name is not None:
                where = f"%{r.name} ({node.op}{' at ' + node.loc.module if node.loc.module else ''})"
                _check_finite(out, where, batch)
                out = real_tokens(out, sweep.masks[batch]) if isinstance(out, torch.Tensor) else out
                if not isinstance(out, torch.Tensor) or out.numel():
                    stats[name].update(out)

    stops = [s for s in block_starts(sweep.executor)[1:] if s < last] + [last]
    with torch.no_grad():
        for stop in tqdm(stops, desc=desc, disable=not progress, unit="block", leave=False):
            sweep.advance(stop, hook)
    return stats
