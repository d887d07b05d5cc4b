"""Resuming a long calibration sweep: after each finished block, the rounded weights so far and
the values crossing the block boundary are written to a work folder; a run interrupted later
starts again from there instead of from the first block.

The folder holds ``progress.json`` (what the state belongs to, a fingerprint of the graph, the
pass and the calibration data, and how far it got), ``results-NNNN.safetensors`` (one per
save: each layer's codes, scale and zero point, their attributes in the metadata)
and ``boundary/batchN.safetensors`` (each batch's live values at the boundary). Only JSON and
safetensors are read back; a state whose fingerprint differs is ignored (with a note) and
overwritten.

    ckpt = SweepCheckpoint(work_dir, fingerprint)
    state = ckpt.load()            # None, or (blocks done, step, results, environments)
    ckpt.save(blocks_done, step, new_results, environments, shared_slots)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.ir.graph import Graph, tensor_digest
from lowbit.ir.printer import format_node
from lowbit.ir.store import LazyTensor

FORMAT = "lowbit-sweep-checkpoint"
VERSION = 1


@dataclass
class Rounded:
    """One layer's rounding: codes, scale, zero point (or None) and the dequantize attributes."""

    q: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor | None
    attrs: dict


def fingerprint(graph: Graph, what: str, batches: list[list]) -> str:
    """A hash of the graph's structure and constants (a constant read from a model's file by
    its file, place and modification time; one in memory or in a temporary file by content),
    ``what`` (the pass and its options) and the calibration batches."""
    h = hashlib.sha1(f"{FORMAT}/{VERSION}\n{what}\n".encode())
    for v in graph.inputs:
        h.update(f"{v.name}: {v.type}\n".encode())
    for node in graph.nodes:
        h.update(format_node(node).encode())
    for name in graph.tensors:
        item = graph.tensors.raw(name)
        if isinstance(item, LazyTensor) and "lowbit-offload-" not in item.path:
            stat = os.stat(item.path)
            h.update(f"{name} {item.path} {item.offset} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        else:
            h.update(f"{name} {tensor_digest(item.load() if isinstance(item, LazyTensor) else item)}\n".encode())
    for batch in batches:
        for x in batch:
            h.update((tensor_digest(x) if isinstance(x, torch.Tensor) else repr(x)).encode())
    return h.hexdigest()


class SweepCheckpoint:
    def __init__(self, folder: str | os.PathLike, key: str):
        self.folder = Path(folder)
        self.key = key
        self.note: str | None = None  # why an existing state was not used

    def load(self) -> tuple[int, int, dict[str, Rounded], list[list | None]] | None:
        from safetensors.torch import load_file

        progress = self.folder / "progress.json"
        if not progress.is_file():
            return None
        try:
            state = json.loads(progress.read_text())
            if state.get("format") != FORMAT or state.get("fingerprint") != self.key:
                self.note = f"{self.folder}: the saved state is for another model, pipeline or calibration set; starting over"
                return None
            results: dict[str, Rounded] = {}
            for name in state["results"]:
                path = self.folder / name
                tensors, meta = load_file(path), _metadata(path)
                for name, attrs in json.loads(meta["layers"]).items():
                    results[name] = Rounded(tensors[f"{name}.q"], tensors[f"{name}.scale"],
                                            tensors.get(f"{name}.zp"), attrs)
            envs = [self._load_env(b, state["slots"], state["scalars"][b]) for b in range(state["batches"])]
        except (OSError, ValueError, KeyError) as e:
            self.note = f"{self.folder}: the saved state cannot be read ({e}); starting over"
            return None
        return state["blocks"], state["step"], results, envs

    def _load_env(self, b: int, slots: int, scalars: dict) -> list:
        from safetensors.torch import load_file

        env: list = [None] * slots
        for key, t in load_file(self.folder / "boundary" / f"batch{b}.safetensors").items():
            env[int(key)] = t
        for key, x in scalars.items():
            env[int(key)] = x
        return env

    def save(self, blocks: int, step: int, results: dict[str, Rounded], envs, shared: set[int]) -> bool:
        """Write the state with ``blocks`` blocks finished and the sweep at ``step``; ``results``:
        the layers rounded since the last save; ``envs``: the sweep's per-batch environments
        (``len``, ``get``, ``put``), ``shared``: their slots that hold constants (read again on
        resume). False (nothing written) if an environment holds something other than tensors
        and numbers."""
        from safetensors.torch import save_file

        (self.folder / "boundary").mkdir(parents=True, exist_ok=True)
        progress = self.folder / "progress.json"
        previous = json.loads(progress.read_text()).get("results", []) if progress.is_file() else []
        progress.unlink(missing_ok=True)  # the files below are being replaced: no state until done
        scalars, slots = [], 0
        for b in range(len(envs)):
            env = envs.get(b)
            other = {i: x for i, x in enumerate(env) if x is not None and i not in shared
                     and not isinstance(x, torch.Tensor)}
            if any(not isinstance(x, (int, float, bool)) for x in other.values()):
                envs.put(b, env)
                return False
            scalars.append({str(i): x for i, x in other.items()})
            save_file({str(i): x.contiguous() for i, x in enumerate(env) if isinstance(x, torch.Tensor)
                       and i not in shared}, self.folder / "boundary" / f"batch{b}.safetensors")
            slots = len(env)
            envs.put(b, env)
        name = f"results-{len(previous):04d}.safetensors"
        layers, tensors = {}, {}
        for layer, r in results.items():
            layers[layer] = r.attrs
            tensors.update({f"{layer}.q": r.q, f"{layer}.scale": r.scale})
            if r.zp is not None:
                tensors[f"{layer}.zp"] = r.zp
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.folder / name,
                  metadata={"layers": json.dumps(layers)})
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "fingerprint": self.key, "blocks": blocks,
                                   "step": step, "batches": len(envs), "slots": slots, "scalars": scalars,
                                   "results": previous + [name]}))
        os.replace(tmp, progress)
        return True

    def clear(self) -> None:
        """The sweep finished: its state is no longer needed."""
        if (self.folder / "progress.json").is_file():
            (self.folder / "progress.json").unlink()
            shutil.rmtree(self.folder / "boundary", ignore_errors=True)
            for path in self.folder.glob("results-*.safetensors"):
                path.unlink()


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}
