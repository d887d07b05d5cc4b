"""Where a graph's constants live: in memory, or in files read when a constant is used.

A ``LazyTensor`` names a tensor inside a safetensors file (a model folder's own shards, or a
file lowbit wrote). It knows its shape and dtype without reading the file; ``load()`` reads it
with plain file reads (not a memory map, so the bytes never count in the process's resident
set once the tensor is dropped) and casts it to the dtype the graph computes in.

``TensorStore`` is the graph's name → tensor mapping. ``store[name]`` gives a tensor (a lazy
one is read on each access and not kept); ``store.raw(name)`` gives what is stored, and
``store.meta(name)`` its (shape, dtype) without reading. With ``offload_to(folder)`` every
large tensor written afterwards (a pass's scaled weight, GPTQ's codes) goes to a file there
and is held as a ``LazyTensor``: a model larger than memory stays on disk while it is
transformed, one layer's weights in memory at a time.

    store = TensorStore()
    store.update(lazy_safetensors(path, {"w": torch.float32}))   # nothing read yet
    w = store["w"]                                                 # read now
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.errors import LowbitError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
OFFLOAD_MIN_ELEMENTS = 1 << 16  # smaller tensors (scales, norms) stay in memory
MAX_HEADER = 100 << 20


class WeightFileError(LowbitError):
    pass


@dataclass(eq=False)
class LazyTensor:
    """``shape``/``dtype``: what the graph sees; the file holds ``stored`` at ``offset``."""

    path: str
    offset: int
    stored: torch.dtype
    shape: tuple[int, ...]
    dtype: torch.dtype
    digest: str | None = field(default=None, repr=False)  # the printer's content hash, once computed
    stamp: tuple[int, int] | None = field(default=None, repr=False)  # the file's (size, mtime) when opened

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def load(self) -> torch.Tensor:
        n = self.numel() * torch.empty((), dtype=self.stored).element_size()
        raw = torch.empty(n, dtype=torch.uint8)
        try:
            if self.stamp is not None and _stamp(self.path) != self.stamp:
                raise WeightFileError(f"{self.path} changed after lowbit opened it: its weights can no longer "
                                      "be read consistently (compile again from the current files)")
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                got = f.readinto(memoryview(raw.numpy()))
        except OSError as e:
            raise WeightFileError(f"cannot read weights from {self.path}: {e}") from None
        if got != n:
            raise WeightFileError(f"{self.path} is truncated: wanted {n} bytes at offset {self.offset}, got {got}")
        t = raw.view(self.stored).reshape(self.shape)
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def with_dtype(self, dtype: torch.dtype) -> LazyTensor:
        return LazyTensor(self.path, self.offset, self.stored, self.shape, dtype, stamp=self.stamp)

    def clone(self) -> LazyTensor:  # immutable: a copy of a graph shares it
        return self

    def detach(self) -> LazyTensor:
        return self


@dataclass(eq=False)
class LazyRows(LazyTensor):
    """A tensor assembled from rows of several stored tensors (a model's stacked MoE experts,
    which its checkpoint holds one expert matrix per key): ``parts`` pairs each stored tensor
    with the rows (of this tensor seen as [rows, last dim]) it fills. ``path`` and ``offset``
    are the first part's."""

    parts: tuple = ()

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        flat = out.view(-1, self.shape[-1])
        for part, rows in self.parts:
            flat[rows] = part.load().reshape(-1, self.shape[-1]).to(self.dtype)
        return out

    def with_dtype(self, dtype: torch.dtype) -> LazyRows:
        return LazyRows(self.path, self.offset, self.stored, self.shape, dtype, stamp=self.stamp,
                        parts=tuple((part.with_dtype(dtype), rows) for part, rows in self.parts))


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The header of a safetensors file (name → dtype, shape, data_offsets) and where the data
    starts. Only the JSON header is parsed; nothing is unpickled."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise WeightFileError(f"{path} is not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise WeightFileError(f"{path} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError(f"cannot read the safetensors header of {path}: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _stamp(path: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def lazy_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file as a ``LazyTensor`` in its stored dtype. A file
    shorter than its header says, or changed later, is an error when read."""
    header, start = read_safetensors_header(path)
    stamp = _stamp(path)
    ends = [entry.get("data_offsets", (0, 0))[1] for entry in header.values()]
    if start + max(ends, default=0) > stamp[0]:
        raise WeightFileError(f"{path} is truncated: its header describes {start + max(ends)} bytes, "
                              f"the file has {stamp[0]}")
    out = {}
    for name, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise WeightFileError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which lowbit does not read")
        begin, end = entry["data_offsets"]
        lazy = LazyTensor(str(path), start + begin, dtype, tuple(entry["shape"]), dtype, stamp=stamp)
        if lazy.numel() * torch.empty((), dtype=dtype).element_size() != end - begin:
            raise WeightFileError(f"{path}: tensor {name!r}'s offsets do not match its shape {entry['shape']}")
        out[name] = lazy
    return out


class TensorStore(MutableMapping):
    """A graph's constants by name; see the module docstring."""

    def __init__(self, items: Mapping | None = None):
        self._items: dict[str, torch.Tensor | LazyTensor] = {}
        self._offload: tempfile.TemporaryDirectory | None = None
        if items:
            self.update(items)

    def __getitem__(self, name: str) -> torch.Tensor:
        item = self._items[name]
        return item.load() if isinstance(item, LazyTensor) else item

    def __setitem__(self, name: str, tensor: torch.Tensor | LazyTensor) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta" \
                and tensor.untyped_storage().nbytes() > 2 * tensor.numel() * tensor.element_size() + 64:
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # a view would keep its base alive
        if self._offload is not None and isinstance(tensor, torch.Tensor) \
                and tensor.numel() >= OFFLOAD_MIN_ELEMENTS and tensor.device.type == "cpu":
            tensor = self._write(name, tensor)
        self._items[name] = tensor

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def raw(self, name: str) -> torch.Tensor | LazyTensor:
        return self._items[name]

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        item = self._items[name]
        return tuple(item.shape), item.dtype

    def is_lazy(self, name: str) -> bool:
        return isinstance(self._items[name], LazyTensor)

    def nbytes(self, name: str) -> int:
        item = self._items[name]
        return item.nbytes if isinstance(item, LazyTensor) else item.numel() * item.element_size()

    def copy(self, order: Iterable[str] | None = None, share: bool = False) -> TensorStore:
        """Tensors in memory cloned (``share``: shared, for a copy that never writes them in
        place), lazy ones shared (they never change); offloading carries over. ``order``: the
        names in the order the copy lists them (default: this store's)."""
        out = TensorStore()
        out._offload = self._offload
        keys = self._items if order is None else order
        out._items = {k: self._items[k] if share else self._items[k].clone() for k in keys}
        return out

    @property
    def offloaded(self) -> bool:
        return self._offload is not None

    def offload_to(self, folder: str | os.PathLike | None = None) -> None:
        """From now on, large tensors written to the store go to files in a fresh folder
        (under ``folder``, or the system's temporary folder), removed with the store."""
        if self._offload is None:
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
            self._offload = tempfile.TemporaryDirectory(prefix="lowbit-offload-", dir=folder)

    def _write(self, name: str, tensor: torch.Tensor) -> LazyTensor:
        data = tensor.detach().contiguous()
        fd, path = tempfile.mkstemp(suffix=".bin", dir=self._offload.name)
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        return LazyTensor(path, 0, data.dtype, tuple(data.shape), data.dtype)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | LazyTensor],
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``tensors``, written one tensor at a time (a lazy one is read
    just before it is written), so writing takes one tensor's memory. Tensors may share
    memory; each is written whole."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_NAMES:
            raise WeightFileError(f"tensor {name!r} has dtype {t.dtype}, which safetensors does not hold")
        n = math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            data = (t.load() if isinstance(t, LazyTensor) else t).detach().cpu().contiguous()
            f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
