"""Registry sizes: shared objects once, and two methods that agree."""

from __future__ import annotations

import sys

from benchmarks.sizing import deep_size, registry_bytes, synthetic_registry_bytes
from scrapy_resilience.core.circuit import CircuitConfig
from scrapy_resilience.core.registry import DomainRegistry


def test_shared_objects_counted_once() -> None:
    shared = "x" * 1000
    seen: set[int] = set()

    first = deep_size([shared], seen)
    second = deep_size([shared], seen)

    assert first == sys.getsizeof([shared]) + sys.getsizeof(shared)
    assert second == sys.getsizeof([shared])


def test_skipped_and_singletons_not_counted() -> None:
    config = CircuitConfig()
    size = deep_size([config, None, True, 7], set(), frozenset({id(config)}))

    assert size == sys.getsizeof([config, None, True, 7])


def test_registry_size_grows_per_domain() -> None:
    registry = DomainRegistry(CircuitConfig())
    for number in range(100):
        registry.get(f"h{number:05d}.test")

    total, domains = registry_bytes(registry)

    assert domains == 100
    assert 100 * 200 < total < 100 * 2000


def test_traced_and_deep_size_agree() -> None:
    config = CircuitConfig()
    registry = DomainRegistry(config)
    for number in range(2000):
        state = registry.get(f"h{number:05d}.test")
        registry.start_attempt(state, probe=False)
        registry.record_success(state, 0.0, probe=False)

    deep, domains = registry_bytes(registry)
    traced, synthetic_domains = synthetic_registry_bytes(config, 2000)

    assert synthetic_domains == domains == 2000
    # The traced figure includes allocator rounding and the dict's list nodes.
    assert 0.7 < deep / traced < 1.3
