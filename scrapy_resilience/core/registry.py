"""Per-domain state shared by every component, and the admission rules.

One :class:`DomainRegistry` exists per crawler. It is pure: the clock is the
``now`` argument (monotonic seconds) and randomness comes from the injected
generator, so admission is tested without a reactor.
"""

from __future__ import annotations

import enum
import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, NamedTuple

from scrapy_resilience.core.circuit import (
    Circuit,
    CircuitConfig,
    CircuitState,
    Transition,
)
from scrapy_resilience.core.classify import Category
from scrapy_resilience.core.pacing import effective_delay, next_admission_time


class Decision(str, enum.Enum):
    ADMIT = "admit"
    HOLD = "hold"
    REJECT = "reject"


class Verdict(NamedTuple):
    """What admission does with a request now.

    ``wake_at`` is the monotonic time when a held request may be admissible
    again, or None when only a finishing attempt can change the answer.
    """

    decision: Decision
    reason: str = ""
    wake_at: float | None = None
    probe: bool = False


class DomainState:
    """Per-domain state: circuit, pause, pacing, in-flight counts and counters."""

    __slots__ = (
        "after_pause",
        "attempting",
        "attempts",
        "circuit",
        "failures",
        "floor_delay",
        "held",
        "inflight",
        "key",
        "next_admit_at",
        "pause_until",
        "rejected",
        "released",
        "retry_after_capped",
        "successes",
        "throttle_delay",
    )

    def __init__(self, key: str, config: CircuitConfig) -> None:
        self.key = key
        self.circuit = Circuit(config)
        self.inflight = 0
        self.attempting = 0
        self.pause_until = 0.0
        self.after_pause = False
        self.floor_delay = 0.0
        self.throttle_delay = 0.0
        self.next_admit_at = 0.0
        self.held = 0
        self.released = 0
        self.attempts = 0
        self.successes = 0
        self.rejected = 0
        self.failures: dict[str, int] | None = None
        self.retry_after_capped = False

    @property
    def delay(self) -> float:
        """The pacing delay in force, in seconds."""
        return effective_delay(self.floor_delay, self.throttle_delay)

    @property
    def busy(self) -> bool:
        """Whether the domain must stay in the registry (never evicted)."""
        circuit = self.circuit
        return bool(
            self.inflight
            or self.held
            or self.released
            or self.pause_until
            or circuit.state is not CircuitState.CLOSED
            or circuit.given_up
            or circuit.consecutive_failures
        )

    def count_failure(self, category: Category) -> None:
        if self.failures is None:
            self.failures = {}
        self.failures[category.value] = self.failures.get(category.value, 0) + 1


class DomainRegistry:
    """Per-domain state, bounded in size, with the admission rules.

    ``on_transition(key, transition)`` is called for every circuit change.
    Idle healthy domains are evicted, least recently used first, when more
    than ``max_domains`` are known; busy ones never are.
    """

    def __init__(
        self,
        config: CircuitConfig,
        *,
        rng: random.Random | None = None,
        max_domains: int = 100_000,
        pace_jitter: float = 0.1,
        on_transition: Callable[[str, Transition], None] | None = None,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.max_domains = max_domains
        self.pace_jitter = pace_jitter
        self.on_transition = on_transition
        self.suspect_inflight = 0
        self.evicted = 0
        self._domains: OrderedDict[str, DomainState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._domains)

    def __iter__(self) -> Iterator[DomainState]:
        return iter(list(self._domains.values()))

    def get(self, key: str) -> DomainState:
        """Return the state of ``key``, creating it, and mark it recently used."""
        state = self._domains.get(key)
        if state is None:
            state = DomainState(key, self.config)
            self._domains[key] = state
            self._evict()
        else:
            self._domains.move_to_end(key)
        return state

    def peek(self, key: str) -> DomainState | None:
        return self._domains.get(key)

    def forget_evicted(self, records: MutableMapping[str, Any]) -> None:
        """Delete the entries of ``records``, a component's own per-domain
        records, whose domain the registry evicted."""
        for key in [key for key in records if key not in self._domains]:
            del records[key]

    def poll(self, state: DomainState, now: float) -> None:
        """Apply time-driven circuit changes (open time over)."""
        transition = state.circuit.poll(now)
        if transition is not None:
            self._emit(state, transition)

    # Admission

    def verdict(
        self,
        state: DomainState,
        now: float,
        per_domain_limit: int,
        suspect_limit: int,
        *,
        paced: bool = True,
    ) -> Verdict:
        """Decide whether a request for ``state``'s domain may start now.

        ``paced=False`` exempts the request from the domain's pacing delay
        (``resilience_dont_throttle``); pauses and in-flight bounds still apply.
        """
        self.poll(state, now)
        circuit = state.circuit
        if circuit.given_up:
            return Verdict(Decision.REJECT, circuit.give_up_reason or "given up")
        if state.pause_until > now:
            return Verdict(Decision.HOLD, "paused", state.pause_until)
        state.pause_until = 0.0
        if circuit.state is CircuitState.OPEN:
            return Verdict(Decision.HOLD, "open", circuit.open_until)

        allowance = circuit.allowance(per_domain_limit)
        delayed = paced and state.delay > 0
        if delayed or state.after_pause:
            allowance = min(allowance, 1)
        if delayed and now < state.next_admit_at:
            return Verdict(Decision.HOLD, "paced", state.next_admit_at)
        if state.inflight >= allowance:
            return Verdict(Decision.HOLD, "busy")
        if circuit.suspect and self.suspect_inflight >= suspect_limit:
            return Verdict(Decision.HOLD, "unproven")
        return Verdict(Decision.ADMIT, probe=circuit.state is CircuitState.HALF_OPEN)

    def admit(self, state: DomainState, now: float, *, paced: bool = True) -> bool:
        """Count an admitted request; return whether it counts as suspect.

        A request admitted with ``paced=False`` does not move the domain's
        next admission time.
        """
        state.inflight += 1
        if paced and state.delay > 0:
            state.next_admit_at = next_admission_time(now, state.delay, self.pace_jitter, self.rng)
        suspect = state.circuit.suspect
        if suspect:
            self.suspect_inflight += 1
        return suspect

    def finish(self, state: DomainState, *, suspect: bool) -> None:
        """Count the end of an admitted request, whatever its outcome."""
        state.inflight = max(0, state.inflight - 1)
        if suspect:
            self.suspect_inflight = max(0, self.suspect_inflight - 1)

    # Attempt outcomes

    def attempt_allowed(self, state: DomainState, now: float, *, probe: bool) -> bool:
        """Decide at the download handler whether an admitted attempt may start.

        Admission already checked; this catches what changed while the request
        waited inside the downloader (robots.txt, other middlewares): a circuit
        that opened, a pause, or failures that shrank a suspect domain's
        allowance.
        """
        self.poll(state, now)
        circuit = state.circuit
        if circuit.given_up or state.pause_until > now or circuit.state is CircuitState.OPEN:
            return False
        if circuit.state is CircuitState.HALF_OPEN:
            return probe and circuit.can_probe()
        if circuit.suspect:
            return state.attempting < circuit.attempt_limit()
        return True

    def start_attempt(self, state: DomainState, *, probe: bool) -> None:
        state.attempting += 1
        state.attempts += 1
        if probe:
            state.circuit.start_probe()

    def record_success(self, state: DomainState, now: float, *, probe: bool) -> None:
        """Record an attempt the domain answered (any status that is not a failure)."""
        state.attempting = max(0, state.attempting - 1)
        state.successes += 1
        state.after_pause = False
        transition = state.circuit.record_success(now, probe=probe)
        if transition is not None:
            self._emit(state, transition)

    def record_failure(
        self, state: DomainState, category: Category, now: float, *, probe: bool
    ) -> None:
        """Record a failed attempt."""
        state.attempting = max(0, state.attempting - 1)
        state.count_failure(category)
        transition = state.circuit.record_failure(category, now, self.rng, probe=probe)
        if transition is not None:
            self._emit(state, transition)

    def record_no_outcome(self, state: DomainState, *, probe: bool) -> None:
        """Record an attempt that ended without telling anything (cancelled, ignored)."""
        state.attempting = max(0, state.attempting - 1)
        if probe:
            state.circuit.end_probe_without_verdict()

    def pause(self, state: DomainState, until: float) -> bool:
        """Pause the domain until ``until``; return whether the pause grew.

        A pause is never shortened by a later, shorter ``Retry-After``.
        """
        if until <= state.pause_until:
            return False
        state.pause_until = until
        state.after_pause = True
        return True

    def give_up(self, state: DomainState, reason: str) -> None:
        if not state.circuit.given_up:
            self._emit(state, state.circuit.give_up(reason))

    # Persistence

    def snapshot(self, now: float) -> dict[str, Any]:
        """Return the state worth keeping across a restart, times as remaining seconds."""
        domains = {}
        for state in self._domains.values():
            circuit = state.circuit
            if not (
                circuit.proven or circuit.times_opened or circuit.given_up or state.pause_until
            ):
                continue
            domains[state.key] = {
                "circuit": circuit.to_state(now),
                "pause_remaining": max(0.0, state.pause_until - now) if state.pause_until else 0.0,
                "attempts": state.attempts,
                "successes": state.successes,
                "failures": state.failures or {},
                "rejected": state.rejected,
            }
        return {"version": 1, "domains": domains}

    def restore(self, snapshot: dict[str, Any], now: float) -> int:
        """Load a :meth:`snapshot`; return how many domains it held."""
        domains = snapshot.get("domains", {})
        for key, data in domains.items():
            state = self.get(key)
            state.circuit.restore(data["circuit"], now)
            remaining = float(data.get("pause_remaining") or 0.0)
            if remaining > 0:
                self.pause(state, now + remaining)
            state.attempts = int(data.get("attempts", 0))
            state.successes = int(data.get("successes", 0))
            state.failures = dict(data.get("failures") or {}) or None
            state.rejected = int(data.get("rejected", 0))
        return len(domains)

    def _emit(self, state: DomainState, transition: Transition) -> None:
        if self.on_transition is not None:
            self.on_transition(state.key, transition)

    def _evict(self) -> None:
        excess = len(self._domains) - self.max_domains
        if excess <= 0:
            return
        # Scan the least recently used end only, so one call stays cheap
        # however many domains are known.
        for key in list(itertools.islice(self._domains, excess + 64)):
            if excess <= 0:
                break
            if not self._domains[key].busy:
                del self._domains[key]
                self.evicted += 1
                excess -= 1
