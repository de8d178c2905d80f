"""The bundle CPU timer: outermost calls only, and signal keywords filtered."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from benchmarks.crawl import BundleTimer, bundle_class_paths


class Component:
    def outer(self, value: int) -> int:
        return self.inner(value) + 1

    def inner(self, value: int) -> int:
        return value * 2

    def handler(self, request: str) -> str:
        return request

    def generator(self) -> Any:
        yield 1


@pytest.fixture
def component_path(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("bench_fake_module")
    fresh = type("Component", (), dict(vars(Component)))
    module.Component = fresh  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench_fake_module", module)
    return "bench_fake_module.Component"


def test_counts_outermost_calls(component_path: str) -> None:
    timer = BundleTimer()
    timer.instrument(component_path)
    instance = sys.modules["bench_fake_module"].Component()

    assert instance.outer(2) == 5
    assert instance.inner(1) == 2

    assert timer.calls == 2
    assert timer.nanoseconds >= 0
    assert timer.instrumented == [component_path]


def test_drops_unknown_keywords(component_path: str) -> None:
    timer = BundleTimer()
    timer.instrument(component_path)
    instance = sys.modules["bench_fake_module"].Component()

    assert instance.handler(request="r", signal=object(), sender=None) == "r"


def test_generators_left_alone(component_path: str) -> None:
    timer = BundleTimer()
    timer.instrument(component_path)
    component = sys.modules["bench_fake_module"].Component

    assert component.generator is Component.generator


def test_missing_class_skipped() -> None:
    timer = BundleTimer()
    timer.instrument("bench_no_such_module.Thing")
    timer.instrument("benchmarks.crawl.NoSuchClass")

    assert timer.instrumented == []


def test_keeps_signature_for_scrapy() -> None:
    import inspect

    timer = BundleTimer()
    wrapped = timer._wrap(Component.handler)

    assert list(inspect.signature(wrapped).parameters) == ["self", "request"]


def test_bundle_classes_found() -> None:
    paths = bundle_class_paths()

    assert "scrapy_resilience.runtime.Runtime" in paths
    assert "scrapy_resilience.hold.RequestHold" in paths
    assert (
        "scrapy_resilience.downloadermiddlewares.circuitbreaker.CircuitBreakerMiddleware" in paths
    )
    assert "scrapy_resilience.downloadermiddlewares.retry.BackoffRetryMiddleware" in paths
    assert "scrapy_resilience.extensions.memory.MemoryGuard" in paths
    assert not any(path.startswith("scrapy_resilience.core.") for path in paths)
