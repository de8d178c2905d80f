"""Admission rules of the domain registry, driven by a fake clock."""

from __future__ import annotations

import random

from scrapy_resilience.core.circuit import CircuitConfig
from scrapy_resilience.core.classify import Category
from scrapy_resilience.core.registry import Decision, DomainRegistry

LIMIT = 8
SUSPECT_LIMIT = 8


def make_registry(**overrides: object) -> DomainRegistry:
    config = CircuitConfig(**{"open_jitter": 0.0, **overrides})  # type: ignore[arg-type]
    return DomainRegistry(config, rng=random.Random(1), pace_jitter=0.1)


def admit_until_held(
    registry: DomainRegistry, key: str, now: float = 0.0, limit: int = LIMIT
) -> int:
    state = registry.get(key)
    admitted = 0
    while registry.verdict(state, now, limit, SUSPECT_LIMIT).decision is Decision.ADMIT:
        registry.admit(state, now)
        admitted += 1
        if admitted > 100:
            break
    return admitted


def prove(registry: DomainRegistry, key: str) -> None:
    state = registry.get(key)
    registry.start_attempt(state, probe=False)
    registry.record_success(state, 0.0, probe=False)


def test_new_domain_limited_to_threshold_in_flight() -> None:
    registry = make_registry(failure_threshold=5)
    assert admit_until_held(registry, "new.test", limit=16) == 5


def test_proven_domain_uses_per_domain_limit() -> None:
    registry = make_registry(failure_threshold=5)
    prove(registry, "ok.test")
    assert admit_until_held(registry, "ok.test", limit=16) == 16


def test_suspect_domains_share_half_concurrency() -> None:
    registry = make_registry(failure_threshold=5)
    state = registry.get("a.test")
    for _ in range(5):
        registry.admit(state, 0.0)
    other = registry.get("b.test")
    assert registry.verdict(other, 0.0, LIMIT, suspect_limit=5).reason == "unproven"
    assert registry.verdict(other, 0.0, LIMIT, suspect_limit=6).decision is Decision.ADMIT


def test_finish_releases_suspect_share() -> None:
    registry = make_registry()
    state = registry.get("a.test")
    suspect = registry.admit(state, 0.0)
    assert registry.suspect_inflight == 1
    registry.finish(state, suspect=suspect)
    assert registry.suspect_inflight == 0
    assert state.inflight == 0


def test_pause_holds_until_its_end() -> None:
    registry = make_registry()
    prove(registry, "p.test")
    state = registry.get("p.test")
    registry.pause(state, 10.0)
    verdict = registry.verdict(state, 9.99, LIMIT, SUSPECT_LIMIT)
    assert verdict.decision is Decision.HOLD
    assert verdict.wake_at == 10.0
    assert registry.verdict(state, 10.0, LIMIT, SUSPECT_LIMIT).decision is Decision.ADMIT


def test_pause_never_shortened() -> None:
    registry = make_registry()
    state = registry.get("p.test")
    assert registry.pause(state, 10.0)
    assert not registry.pause(state, 5.0)
    assert state.pause_until == 10.0


def test_first_request_after_pause_goes_alone() -> None:
    registry = make_registry()
    prove(registry, "p.test")
    state = registry.get("p.test")
    registry.pause(state, 1.0)
    assert admit_until_held(registry, "p.test", now=2.0) == 1
    registry.start_attempt(state, probe=False)
    registry.record_success(state, 2.0, probe=False)
    registry.finish(state, suspect=False)
    assert admit_until_held(registry, "p.test", now=2.0) == LIMIT


def test_paced_domain_one_at_a_time_with_spacing() -> None:
    registry = make_registry()
    prove(registry, "slow.test")
    state = registry.get("slow.test")
    state.floor_delay = 2.0
    assert registry.verdict(state, 0.0, LIMIT, SUSPECT_LIMIT).decision is Decision.ADMIT
    registry.admit(state, 0.0)
    assert registry.verdict(state, 0.0, LIMIT, SUSPECT_LIMIT).reason == "paced"
    registry.finish(state, suspect=False)

    held = registry.verdict(state, 1.0, LIMIT, SUSPECT_LIMIT)
    assert held.reason == "paced"
    assert held.wake_at is not None
    assert 2.0 <= held.wake_at <= 2.2
    assert registry.verdict(state, 2.2, LIMIT, SUSPECT_LIMIT).decision is Decision.ADMIT


def test_open_circuit_holds_then_probe_admitted_alone() -> None:
    registry = make_registry(failure_threshold=1, open_seconds=30)
    prove(registry, "x.test")
    state = registry.get("x.test")
    registry.start_attempt(state, probe=False)
    registry.record_failure(state, Category.NETWORK, 0.0, probe=False)
    verdict = registry.verdict(state, 1.0, LIMIT, SUSPECT_LIMIT)
    assert verdict.reason == "open"
    assert verdict.wake_at == 30.0

    probe = registry.verdict(state, 30.0, LIMIT, SUSPECT_LIMIT)
    assert probe.decision is Decision.ADMIT
    assert probe.probe
    registry.admit(state, 30.0)
    assert registry.verdict(state, 30.0, LIMIT, SUSPECT_LIMIT).decision is Decision.HOLD


def test_given_up_domain_rejected() -> None:
    registry = make_registry()
    state = registry.get("dead.test")
    registry.give_up(state, "test")
    assert registry.verdict(state, 0.0, LIMIT, SUSPECT_LIMIT).decision is Decision.REJECT


def test_attempt_gate_limits_suspect_attempts() -> None:
    registry = make_registry(failure_threshold=5)
    state = registry.get("new.test")
    for _ in range(4):
        registry.start_attempt(state, probe=False)
        registry.record_failure(state, Category.NETWORK, 0.0, probe=False)
    assert registry.attempt_allowed(state, 0.0, probe=False)
    registry.start_attempt(state, probe=False)
    assert not registry.attempt_allowed(state, 0.0, probe=False)


def test_transitions_reported() -> None:
    events: list[tuple[str, str]] = []
    config = CircuitConfig(failure_threshold=1, open_jitter=0.0)
    registry = DomainRegistry(
        config, rng=random.Random(1), on_transition=lambda key, t: events.append((key, t.event))
    )
    state = registry.get("t.test")
    registry.start_attempt(state, probe=False)
    registry.record_failure(state, Category.TIMEOUT, 0.0, probe=False)
    registry.poll(state, 1000.0)
    assert events == [("t.test", "opened"), ("t.test", "half_opened")]


def test_eviction_keeps_busy_domains() -> None:
    registry = DomainRegistry(CircuitConfig(), rng=random.Random(1), max_domains=10)
    busy = registry.get("busy.test")
    registry.pause(busy, 100.0)
    for index in range(50):
        prove(registry, f"d{index}.test")
    assert len(registry) <= 10
    assert registry.peek("busy.test") is busy
    assert registry.evicted >= 40


def test_eviction_evicts_least_recently_used() -> None:
    registry = DomainRegistry(CircuitConfig(), rng=random.Random(1), max_domains=3)
    for name in ("a.test", "b.test", "c.test"):
        prove(registry, name)
    registry.get("a.test")
    prove(registry, "d.test")

    assert registry.peek("b.test") is None
    assert [state.key for state in registry] == ["c.test", "a.test", "d.test"]
    assert registry.evicted == 1


def test_forget_evicted_drops_records_of_evicted_domains() -> None:
    registry = DomainRegistry(CircuitConfig(), rng=random.Random(1), max_domains=2)
    records: dict[str, str] = {}
    for name in ("a.test", "b.test", "c.test"):
        prove(registry, name)
        records[name] = name.upper()

    registry.forget_evicted(records)

    assert records == {"b.test": "B.TEST", "c.test": "C.TEST"}


def test_snapshot_round_trip_keeps_pause_as_remaining_time() -> None:
    registry = make_registry(failure_threshold=1)
    state = registry.get("s.test")
    registry.pause(state, 50.0)
    registry.start_attempt(state, probe=False)
    registry.record_failure(state, Category.NETWORK, 0.0, probe=False)
    snapshot = registry.snapshot(20.0)

    restored = make_registry(failure_threshold=1)
    restored.restore(snapshot, 1000.0)
    again = restored.get("s.test")
    assert again.pause_until == 1030.0
    assert again.circuit.state.value == "open"
    assert again.attempts == 1
