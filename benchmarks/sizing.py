"""Memory of the bundle's domain registry, measured two ways.

``registry_bytes`` walks the live registry at the end of a crawl and adds up
``sys.getsizeof`` of every object it reaches: the registry's ordered dict, each
``DomainState`` with its ``Circuit``, and their attribute values (keys, floats,
failure dicts). Objects shared by every domain (the circuit config, enum members,
cached small ints, ``None``) are counted once, or not at all for interpreter
singletons. ``sys.getsizeof`` leaves out the allocator's rounding and the nodes of
the ordered dict's linked list, so this is a lower bound.

``synthetic_registry_bytes`` fills a new registry with healthy domains under
``tracemalloc``, which counts every allocation (nodes and rounding included), as
a check on the first figure.
"""

from __future__ import annotations

import enum
import sys
import tracemalloc
from collections.abc import Iterable
from typing import Any

# Interpreter singletons and cached objects: they cost nothing per domain.
_LEAF_SINGLETONS = (type(None), bool)


def deep_size(root: Any, seen: set[int], skip: frozenset[int] = frozenset()) -> int:
    """Return the bytes of ``root`` and everything it references, counted once.

    ``seen`` contains the ids already counted and is updated, so sizes of several
    roots that share objects add up correctly. Objects whose id is in ``skip``,
    enum members, ``None``, booleans, small ints and classes are not counted.
    """
    total = 0
    stack = [root]
    while stack:
        value = stack.pop()
        identity = id(value)
        if identity in seen or identity in skip or _is_shared(value):
            continue
        seen.add(identity)
        total += sys.getsizeof(value)
        stack.extend(_referents(value))
    return total


def _is_shared(value: Any) -> bool:
    if isinstance(value, (_LEAF_SINGLETONS, type, enum.Enum)):
        return True
    # CPython caches the ints from -5 to 256.
    return isinstance(value, int) and -5 <= value <= 256


def _referents(value: Any) -> Iterable[Any]:
    if isinstance(value, (str, bytes, int, float)):
        return ()
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)

    referents: list[Any] = []
    for cls in type(value).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(value, name):
                referents.append(getattr(value, name))
    if hasattr(value, "__dict__"):
        referents.append(vars(value))
    return referents


def registry_bytes(registry: Any) -> tuple[int, int]:
    """Return (bytes, domains) of a live ``DomainRegistry``, by ``deep_size``.

    The registry's circuit config is shared by every domain and left out. Reads the
    registry's private ``_domains`` dict, because its public iteration copies it.
    """
    domains = getattr(registry, "_domains", None)
    if domains is None:
        domains = {state.key: state for state in registry}
    skip = frozenset({id(registry.config), id(registry.rng)})
    total = deep_size(domains, set(), skip)
    return total, len(domains)


def synthetic_registry_bytes(config: Any, count: int) -> tuple[int, int]:
    """Return (bytes traced, domains) for ``count`` healthy domains in a new registry.

    Each domain is created with ``get`` and records one successful attempt, as a
    domain that was crawled without trouble does. Only this step is traced.
    """
    from scrapy_resilience.core.registry import DomainRegistry

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        registry = DomainRegistry(config, max_domains=count + 1)
        for number in range(count):
            state = registry.get(f"h{number:05d}.test")
            registry.start_attempt(state, probe=False)
            registry.record_success(state, 0.0, probe=False)
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return traced, len(registry)
