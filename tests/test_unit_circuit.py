"""The circuit state machine, driven by a fake clock."""

from __future__ import annotations

import math
import random

import pytest

from scrapy_resilience.core.circuit import Circuit, CircuitConfig, CircuitState
from scrapy_resilience.core.classify import Category

NETWORK = Category.NETWORK
SERVER = Category.SERVER


def make(**overrides: object) -> Circuit:
    return Circuit(CircuitConfig(**overrides))  # type: ignore[arg-type]


def fail(circuit: Circuit, times: int, category: Category = NETWORK, now: float = 0.0) -> list[str]:
    rng = random.Random(1)
    events = []
    for _ in range(times):
        transition = circuit.record_failure(category, now, rng)
        if transition:
            events.append(transition.event)
    return events


def test_opens_after_threshold_consecutive_failures() -> None:
    circuit = make(failure_threshold=5)
    assert fail(circuit, 4) == []
    assert circuit.state is CircuitState.CLOSED
    assert fail(circuit, 1) == ["opened"]
    assert circuit.state is CircuitState.OPEN


def test_success_resets_consecutive_count() -> None:
    circuit = make(failure_threshold=3)
    fail(circuit, 2)
    circuit.record_success(0.0)
    assert circuit.consecutive_failures == 0
    assert fail(circuit, 2) == []
    assert circuit.state is CircuitState.CLOSED


def test_server_failures_count_only_before_first_success() -> None:
    unproven = make(failure_threshold=3)
    assert fail(unproven, 3, SERVER) == ["opened"]

    proven = make(failure_threshold=3, min_attempts=20, window=20)
    proven.record_success(0.0)
    assert fail(proven, 10, SERVER) == []
    assert proven.consecutive_failures == 0


def test_throttled_and_content_failures_never_count() -> None:
    circuit = make(failure_threshold=2)
    assert fail(circuit, 10, Category.THROTTLED) == []
    assert fail(circuit, 10, Category.CONTENT) == []
    assert circuit.state is CircuitState.CLOSED


def test_failure_rate_opens_proven_domain() -> None:
    circuit = make(failure_threshold=100, failure_rate=0.8, window=20, min_attempts=10)
    rng = random.Random(2)
    circuit.record_success(0.0)
    # 1 success then failures: 8 of 10 failed is 80%.
    for _ in range(7):
        circuit.record_failure(SERVER, 0.0, rng)
    assert circuit.state is CircuitState.CLOSED
    circuit.record_success(0.0)
    transition = circuit.record_failure(SERVER, 0.0, rng)
    assert transition is not None
    assert transition.reason == "failure_rate"


def test_forty_percent_failures_never_open() -> None:
    circuit = make()
    rng = random.Random(3)
    circuit.record_success(0.0)
    pattern = [True, False, True, False, False] * 40  # 40% failures
    for failed in pattern:
        if failed:
            circuit.record_failure(SERVER, 0.0, rng)
        else:
            circuit.record_success(0.0)
    assert circuit.state is CircuitState.CLOSED
    assert circuit.times_opened == 0


def test_open_time_jittered_upward_and_doubles() -> None:
    circuit = make(failure_threshold=1, open_seconds=60, open_max_seconds=600, open_jitter=0.1)
    rng = random.Random(4)
    circuit.record_success(0.0)
    first = circuit.record_failure(NETWORK, 0.0, rng)
    assert first is not None
    assert 60 <= first.open_seconds <= 66

    circuit.poll(first.open_seconds)
    assert circuit.state is CircuitState.HALF_OPEN
    circuit.start_probe()
    second = circuit.record_failure(NETWORK, 100.0, rng, probe=True)
    assert second is not None
    assert second.event == "opened"
    assert 120 <= second.open_seconds <= 132


def test_open_time_capped_at_maximum() -> None:
    circuit = make(
        failure_threshold=1, open_seconds=60, open_max_seconds=100, max_reopens=10, open_jitter=0.0
    )
    rng = random.Random(5)
    circuit.record_success(0.0)
    now = 0.0
    durations = []
    transition = circuit.record_failure(NETWORK, now, rng)
    for _ in range(4):
        assert transition is not None
        durations.append(transition.open_seconds)
        now = circuit.open_until
        circuit.poll(now)
        circuit.start_probe()
        transition = circuit.record_failure(NETWORK, now, rng, probe=True)
    assert durations == [60, 100, 100, 100]


def test_stays_open_until_time_is_up() -> None:
    circuit = make(failure_threshold=1, open_jitter=0.0, open_seconds=60)
    fail(circuit, 1)
    assert circuit.poll(59.9) is None
    assert circuit.state is CircuitState.OPEN
    transition = circuit.poll(60.0)
    assert transition is not None
    assert transition.event == "half_opened"


def test_half_open_admits_limited_probes() -> None:
    circuit = make(failure_threshold=1, half_open_probes=2, open_jitter=0.0)
    circuit.record_success(0.0)
    fail(circuit, 1)
    circuit.poll(1000.0)
    assert circuit.allowance(8) == 2
    circuit.start_probe()
    circuit.start_probe()
    assert not circuit.can_probe()


def test_successful_probe_closes_and_resets_doubling() -> None:
    circuit = make(failure_threshold=1, open_jitter=0.0, open_seconds=10, open_max_seconds=1000)
    rng = random.Random(6)
    circuit.record_success(0.0)
    fail(circuit, 1)
    circuit.poll(10.0)
    circuit.start_probe()
    transition = circuit.record_success(10.0, probe=True)
    assert transition is not None
    assert transition.event == "closed"
    assert circuit.opens_since_close == 0

    reopened = circuit.record_failure(NETWORK, 20.0, rng)
    assert reopened is not None
    assert reopened.open_seconds == 10


def test_unproven_domain_given_up_on_first_failed_probe() -> None:
    circuit = make(failure_threshold=2)
    rng = random.Random(7)
    fail(circuit, 2)
    circuit.poll(math.inf)
    circuit.start_probe()
    transition = circuit.record_failure(NETWORK, 1000.0, rng, probe=True)
    assert transition is not None
    assert transition.event == "given_up"
    assert circuit.given_up
    assert circuit.allowance(8) == 0


def test_proven_domain_given_up_after_max_reopens() -> None:
    circuit = make(failure_threshold=1, max_reopens=3, open_jitter=0.0)
    rng = random.Random(8)
    circuit.record_success(0.0)
    fail(circuit, 1)
    events = []
    for _ in range(3):
        circuit.poll(circuit.open_until)
        circuit.start_probe()
        transition = circuit.record_failure(NETWORK, circuit.open_until, rng, probe=True)
        assert transition is not None
        events.append(transition.event)
    assert events == ["opened", "opened", "given_up"]


def test_drain_cuts_open_time_and_makes_probe_final() -> None:
    circuit = make(
        failure_threshold=1, open_seconds=60, open_max_seconds=600, open_jitter=0.0, max_reopens=10
    )
    rng = random.Random(9)
    circuit.record_success(0.0)
    fail(circuit, 1)
    circuit.poll(60.0)
    circuit.start_probe()
    circuit.record_failure(NETWORK, 60.0, rng, probe=True)
    assert circuit.open_until == 180.0

    assert circuit.drain(70.0)
    assert circuit.open_until == 130.0
    circuit.poll(130.0)
    circuit.start_probe()
    transition = circuit.record_failure(NETWORK, 130.0, rng, probe=True)
    assert transition is not None
    assert transition.event == "given_up"


def test_suspect_allowance_shrinks_with_failures() -> None:
    circuit = make(failure_threshold=5)
    assert circuit.allowance(16) == 5
    fail(circuit, 3)
    assert circuit.allowance(16) == 2
    circuit.record_success(0.0)
    assert circuit.allowance(16) == 16


def test_snapshot_restores_remaining_open_time() -> None:
    circuit = make(failure_threshold=1, open_jitter=0.0, open_seconds=60)
    circuit.record_success(0.0)
    fail(circuit, 1, now=100.0)
    snapshot = circuit.to_state(130.0)
    assert snapshot["open_remaining"] == 30.0

    restored = make(failure_threshold=1)
    restored.restore(snapshot, 5000.0)
    assert restored.state is CircuitState.OPEN
    assert restored.open_until == 5030.0
    assert restored.proven


@pytest.mark.parametrize("probe_category", [Category.THROTTLED, Category.CONTENT])
def test_probe_without_verdict_frees_slot(probe_category: Category) -> None:
    circuit = make(failure_threshold=1)
    fail(circuit, 1)
    circuit.poll(math.inf)
    circuit.start_probe()
    assert not circuit.can_probe()
    circuit.record_failure(probe_category, 0.0, random.Random(), probe=True)
    assert circuit.can_probe()
    assert circuit.state is CircuitState.HALF_OPEN
