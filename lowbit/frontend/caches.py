"""Key/value caches are not traced: a compiled model returns its outputs without them.

A transformers model loaded with its default config has ``use_cache=True`` and returns a
cache object (``DynamicCache``) that torch.export refuses as an output. While tracing,
:func:`without_cache` turns ``config.use_cache`` off (and says so in a note), and registers
every cache class as a pytree node with no leaves, so a model that builds a cache anyway is
still traced; :func:`drop_caches` then turns such nodes of the output structure into nodes
without leaves that give ``None``, which is the model's output minus the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils import _pytree as pytree


def cache_types() -> tuple[type, ...]:
    """transformers' cache classes (empty without transformers)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return ()
    found, todo = [], [Cache]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return tuple(found)


@contextlib.contextmanager
def without_cache(model: torch.nn.Module) -> Iterator[list[str]]:
    """Within: ``model.config.use_cache`` off and cache classes flatten to nothing. Yields the
    notes to show the user."""
    notes: list[str] = []
    config = getattr(model, "config", None)
    was = getattr(config, "use_cache", None)
    if was:
        config.use_cache = False
        generates = getattr(model, "can_generate", lambda: False)()
    if was and generates:  # an encoder's use_cache does nothing worth a note
        notes.append(f"{type(model).__name__} is traced without its key/value cache "
                     "(config.use_cache=False while tracing): the compiled model returns no cache")
    added = []
    for cls in cache_types():
        if cls not in pytree.SUPPORTED_NODES:
            pytree.register_pytree_node(cls, _flatten_nothing, _unflatten_nothing,
                                        flatten_with_keys_fn=_flatten_nothing,
                                        serialized_type_name=f"lowbit.no_cache.{cls.__module__}.{cls.__qualname__}")
            added.append(cls)
    try:
        yield notes
    finally:
        for cls in added:
            pytree._deregister_pytree_node(cls)
        if was:
            config.use_cache = was


def _flatten_nothing(cache: object) -> tuple[list, None]:
    return [], None


def _unflatten_nothing(leaves: list, context: None) -> None:
    return None


class _Dropped:
    """Where a cache stood in an output structure: no leaves, and ``None`` when unflattened
    (torch ≥ 2.13 counts ``None`` itself as a leaf)."""


pytree.register_pytree_node(_Dropped, _flatten_nothing, _unflatten_nothing, flatten_with_keys_fn=_flatten_nothing,
                            serialized_type_name="lowbit.frontend.caches.dropped")


def drop_caches(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """``spec`` with every cache node replaced by one that holds nothing and gives ``None``."""
    caches = cache_types()
    if spec.type in caches:
        return pytree.TreeSpec(_Dropped, None, [])
    if spec.is_leaf():
        return spec
    kids = spec.children() if hasattr(spec, "children") else spec.children_specs  # torch < 2.10
    children = [drop_caches(c) for c in kids]
    return pytree.TreeSpec(spec.type, spec.context, children)
